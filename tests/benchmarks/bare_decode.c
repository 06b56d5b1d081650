/* The baseline for our Python generation loop: llama.cpp's own C API, no Python.
 *
 *   bare_decode MODEL N_PROMPT N_GEN THREADS FLASH_ATTN EXTRA_BUFTS
 *
 * Loads MODEL as LlamaDecoder does with the same settings (CPU, f16 KV cache, n_ctx 1024,
 * n_batch 512; FLASH_ATTN and EXTRA_BUFTS 0 or 1, repacked weights read rather than mapped),
 * evaluates N_PROMPT token positions, then greedily samples and decodes N_GEN tokens one at a
 * time, exactly the work of LlamaDecoder.generate after its prefill. Prints one JSON line with
 * the prefill and decode seconds. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "llama.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)level; (void)text; (void)user;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s MODEL N_PROMPT N_GEN THREADS FLASH_ATTN EXTRA_BUFTS\n", argv[0]);
        return 2;
    }
    const int n_prompt = atoi(argv[2]), n_gen = atoi(argv[3]), threads = atoi(argv[4]);
    const int flash_attn = atoi(argv[5]), extra_bufts = atoi(argv[6]);
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.use_extra_bufts = extra_bufts != 0;
    if (extra_bufts) mp.load_mode = LLAMA_LOAD_MODE_NONE;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 1024;
    cp.n_batch = cp.n_ubatch = 512;
    cp.n_threads = cp.n_threads_batch = threads;
    cp.flash_attn_type = flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx || n_prompt + n_gen + 1 > 1024) { fprintf(stderr, "cannot create the context\n"); return 1; }

    llama_token *prompt = malloc(sizeof(llama_token) * n_prompt);
    for (int i = 0; i < n_prompt; i++) prompt[i] = 100 + i % 1000;
    double t0 = now();
    if (llama_decode(ctx, llama_batch_get_one(prompt, n_prompt)) != 0) { fprintf(stderr, "prefill failed\n"); return 1; }
    double t_prefill = now() - t0;

    struct llama_sampler *smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
    t0 = now();
    for (int k = 0; k < n_gen; k++) {
        llama_token tok = llama_sampler_sample(smpl, ctx, -1);
        if (llama_decode(ctx, llama_batch_get_one(&tok, 1)) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
    }
    double t_decode = now() - t0;
    printf("{\"prefill_s\": %.6f, \"decode_s\": %.6f}\n", t_prefill, t_decode);
    llama_sampler_free(smpl);
    free(prompt);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
