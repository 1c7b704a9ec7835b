// Score token windows with llama.cpp: per-window summed next-token NLL, plus the logits of the
// first window's last position. Token ids come from a file, so the comparison with transformers
// does not depend on either side's text tokenizer.
//
//   llama_nll MODEL.gguf TOKENS.i32 WINDOW N_WINDOWS LOGITS_OUT.f32
// prints one line per window: "<index> <nll_sum> <predicted_tokens>".
#include "llama.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

static void quiet(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static std::vector<llama_token> read_tokens(const char * path) {
    std::vector<llama_token> tokens;
    FILE * f = fopen(path, "rb");
    if (!f) {
        return tokens;
    }
    int32_t id;
    while (fread(&id, sizeof(id), 1, f) == 1) {
        tokens.push_back(id);
    }
    fclose(f);
    return tokens;
}

// -log softmax(logits)[target], computed in double for a stable comparison.
static double token_nll(const float * logits, int n_vocab, llama_token target) {
    double max = logits[0];
    for (int i = 1; i < n_vocab; ++i) {
        max = logits[i] > max ? logits[i] : max;
    }
    double sum = 0.0;
    for (int i = 0; i < n_vocab; ++i) {
        sum += std::exp(logits[i] - max);
    }
    return std::log(sum) + max - logits[target];
}

int main(int argc, char ** argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s MODEL.gguf TOKENS.i32 WINDOW N_WINDOWS LOGITS_OUT.f32\n", argv[0]);
        return 2;
    }
    const int window = atoi(argv[3]);
    const int n_windows = atoi(argv[4]);
    std::vector<llama_token> tokens = read_tokens(argv[2]);
    if ((int) tokens.size() < window * n_windows) {
        fprintf(stderr, "need %d tokens, got %zu\n", window * n_windows, tokens.size());
        return 2;
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mparams = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) {
        fprintf(stderr, "failed to load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = window;
    cparams.n_batch = window;
    cparams.n_ubatch = window;
    cparams.n_threads = 1;
    cparams.n_threads_batch = 1;
    // f32 KV cache (llama.cpp's default is f16): an f32 GGUF is compared at full precision
    cparams.type_k = GGML_TYPE_F32;
    cparams.type_v = GGML_TYPE_F32;
    // plain attention: the CPU flash-attention kernel rounds Q·K through f16
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        fprintf(stderr, "failed to create a context\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_batch batch = llama_batch_init(window, 0, 1);
    for (int w = 0; w < n_windows; ++w) {
        llama_memory_clear(llama_get_memory(ctx), true);
        batch.n_tokens = window;
        for (int i = 0; i < window; ++i) {
            batch.token[i] = tokens[w * window + i];
            batch.pos[i] = i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = true;
        }
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "decode failed on window %d\n", w);
            return 1;
        }
        double nll = 0.0;
        for (int i = 0; i + 1 < window; ++i) {
            nll += token_nll(llama_get_logits_ith(ctx, i), n_vocab, batch.token[i + 1]);
        }
        printf("%d %.10f %d\n", w, nll, window - 1);
        if (w == 0) {
            FILE * out = fopen(argv[5], "wb");
            fwrite(llama_get_logits_ith(ctx, window - 1), sizeof(float), n_vocab, out);
            fclose(out);
        }
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
