// Tokenize a UTF-8 text file with the vocabulary embedded in a GGUF (no BOS, special tokens
// not parsed), writing int32 token ids: checks that our tokenizer metadata makes llama.cpp
// split text as transformers does.
//
//   llama_tokenize MODEL.gguf TEXT.txt IDS_OUT.i32
#include "llama.h"

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static void quiet(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.gguf TEXT.txt IDS_OUT.i32\n", argv[0]);
        return 2;
    }
    std::ifstream in(argv[2], std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    const std::string text = buffer.str();

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mparams = llama_model_default_params();
    mparams.vocab_only = true;
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) {
        fprintf(stderr, "failed to load %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    std::vector<llama_token> ids(text.size() + 16);
    int n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), ids.data(), (int32_t) ids.size(),
                           /*add_special*/ false, /*parse_special*/ false);
    if (n < 0) {
        fprintf(stderr, "tokenization needs %d slots\n", -n);
        return 1;
    }
    FILE * out = fopen(argv[3], "wb");
    fwrite(ids.data(), sizeof(llama_token), n, out);
    fclose(out);
    printf("%d\n", n);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
