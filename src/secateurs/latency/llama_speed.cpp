// Time llama.cpp as llama-bench does (same context settings, random tokens, a warmup, a prompt
// test and a generation test each from an empty cache), reporting each sample's wall time AND
// the process's CPU time. On a shared machine the CPU time of a single-thread run does not count
// the time the process waited for a core, so it stays meaningful when wall time does not.
//
//   llama_speed THREADS N_PROMPT N_GEN REPS MODEL.gguf [MODEL.gguf ...]
// prints one line per sample: "<model>\t<pp|tg>\t<tokens>\t<wall_ns>\t<cpu_ns>".
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <vector>

static void quiet(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static long long now_ns(clockid_t clock) {
    timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

// llama-bench's prompt test: n_prompt random tokens (BOS first if the vocabulary adds one),
// in batches of n_batch, only the last token's logits computed
static bool run_prompt(llama_context * ctx, int n_prompt, int n_batch, int n_vocab, llama_token bos) {
    std::vector<llama_token> tokens(n_batch);
    for (int done = 0; done < n_prompt;) {
        const int n = n_prompt - done < n_batch ? n_prompt - done : n_batch;
        for (int i = 0; i < n; ++i) {
            tokens[i] = (done == 0 && i == 0 && bos >= 0) ? bos : std::rand() % n_vocab;
        }
        if (llama_decode(ctx, llama_batch_get_one(tokens.data(), n)) != 0) {
            return false;
        }
        done += n;
    }
    llama_synchronize(ctx);
    return true;
}

// llama-bench's generation test: one token at a time, synchronised after each
static bool run_gen(llama_context * ctx, int n_gen, int n_vocab, llama_token bos) {
    llama_token token = bos >= 0 ? bos : std::rand() % n_vocab;
    for (int i = 0; i < n_gen; ++i) {
        if (llama_decode(ctx, llama_batch_get_one(&token, 1)) != 0) {
            return false;
        }
        llama_synchronize(ctx);
        token = std::rand() % n_vocab;
    }
    return true;
}

struct Timer {
    long long wall, cpu;
    Timer() : wall(now_ns(CLOCK_MONOTONIC)), cpu(now_ns(CLOCK_PROCESS_CPUTIME_ID)) {}
    void print(const char * model, const char * test, int tokens) const {
        printf("%s\t%s\t%d\t%lld\t%lld\n", model, test, tokens, now_ns(CLOCK_MONOTONIC) - wall,
               now_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu);
    }
};

static int time_model(const char * path, int threads, int n_prompt, int n_gen, int reps,
                      ggml_threadpool * pool) {
    llama_model * model = llama_model_load_from_file(path, llama_model_default_params());
    if (!model) {
        fprintf(stderr, "failed to load %s\n", path);
        return 1;
    }
    llama_context_params cparams = llama_context_default_params();  // f16 KV, flash-attn auto
    cparams.n_ctx = n_prompt + n_gen;
    cparams.n_batch = 2048;  // llama-bench's defaults
    cparams.n_ubatch = 512;
    cparams.n_threads = threads;
    cparams.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        fprintf(stderr, "failed to create a context for %s\n", path);
        return 1;
    }
    llama_attach_threadpool(ctx, pool, nullptr);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    const llama_token bos = llama_vocab_get_add_bos(vocab) ? llama_vocab_bos(vocab) : -1;
    bool ok = run_prompt(ctx, n_prompt, 2048, n_vocab, bos) && run_gen(ctx, 1, n_vocab, bos);
    for (int r = 0; ok && r < reps; ++r) {
        llama_memory_clear(llama_get_memory(ctx), false);
        Timer prompt;
        ok = run_prompt(ctx, n_prompt, 2048, n_vocab, bos);
        prompt.print(path, "pp", n_prompt);
        llama_memory_clear(llama_get_memory(ctx), false);
        Timer gen;
        ok = ok && run_gen(ctx, n_gen, n_vocab, bos);
        gen.print(path, "tg", n_gen);
    }
    fflush(stdout);
    llama_free(ctx);
    llama_model_free(model);
    if (!ok) {
        fprintf(stderr, "decode failed for %s\n", path);
        return 1;
    }
    return 0;
}

int main(int argc, char ** argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s THREADS N_PROMPT N_GEN REPS MODEL.gguf [MODEL.gguf ...]\n", argv[0]);
        return 2;
    }
    const int threads = atoi(argv[1]), n_prompt = atoi(argv[2]), n_gen = atoi(argv[3]);
    const int reps = atoi(argv[4]);
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    // a persistent thread pool, as llama-bench attaches (found through the CPU backend's registry)
    ggml_backend_reg_t cpu = ggml_backend_dev_backend_reg(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
    auto * pool_new = (decltype(ggml_threadpool_new) *) ggml_backend_reg_get_proc_address(cpu, "ggml_threadpool_new");
    auto * pool_free = (decltype(ggml_threadpool_free) *) ggml_backend_reg_get_proc_address(cpu, "ggml_threadpool_free");
    ggml_threadpool_params params = ggml_threadpool_params_default(threads);
    ggml_threadpool * pool = pool_new(&params);
    int status = 0;
    for (int i = 5; i < argc && status == 0; ++i) {
        status = time_model(argv[i], threads, n_prompt, n_gen, reps, pool);
    }
    pool_free(pool);
    llama_backend_free();
    return status;
}
