"""GPU check of RS3 captioning speed: BLIP-2 with OPT-6.7B's real shapes, random weights.

Needs only torch and transformers (no Ray, open_clip or vLLM). Builds the model directly on the
GPU in bf16 (no checkpoint, so no download and a fast init), then times the captioning step the
`caption` stage runs: one vision + Q-Former pass per image and all candidates of a batch from one
`generate` (`num_return_sequences`), nucleus sampling (top_p 0.95, top_k 50). Random weights
rarely emit EOS, so every candidate is forced to exactly `--new-tokens` tokens (min = max): a
fixed, stated amount of work (RS5M's captions are ~10-15 tokens; 50 is the decoding cap).

Also times, with transformers' CLIP towers at ViT-H/14's shapes, ranker A's image pass (one per
image, plus 12 rotated views when it is the rotation model) and its text pass (20 candidates per
image). Prints one JSON object.

    python benchmarks/gpu_caption_check.py                 # H100/H200: about 5 minutes
    python benchmarks/gpu_caption_check.py --tiny          # CPU smoke test of the script itself
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, CLIPTextConfig, CLIPTextModel, \
    CLIPVisionConfig, CLIPVisionModel

# Salesforce/blip2-opt-6.7b: EVA ViT-g/14 (transformers' Blip2VisionConfig defaults), Q-Former
# (Blip2QFormerConfig defaults), OPT-6.7B, 32 query tokens.
OPT_6_7B = {"model_type": "opt", "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32,
            "num_attention_heads": 32, "word_embed_proj_dim": 4096, "max_position_embeddings": 2048,
            "vocab_size": 50272, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}
TINY_OPT = {**OPT_6_7B, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 64, "vocab_size": 1000, "max_position_embeddings": 128}
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
VIT_H_14 = ({"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
             "image_size": 224, "patch_size": 14, "projection_dim": 1024},
            {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "max_position_embeddings": 77, "projection_dim": 1024})


def blip2(tiny: bool) -> Blip2Config:
    if tiny:
        return Blip2Config(vision_config={**TINY_VISION, "image_size": 224, "patch_size": 14},
                           qformer_config={**TINY_VISION, "encoder_hidden_size": 64}, text_config=TINY_OPT,
                           num_query_tokens=32, image_token_index=999)
    return Blip2Config(text_config=OPT_6_7B, num_query_tokens=32, image_token_index=50265)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels, allocator, cuBLAS handles
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def caption_rates(model, device, dtype, batch: int, candidates: int, new_tokens: int, repeats: int) -> dict:
    pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    seconds = timed(lambda: model.generate(pixel_values=pixels, do_sample=True, top_p=0.95, top_k=50,
                                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           num_return_sequences=candidates), device, repeats)
    vision = timed(lambda: model.get_image_features(pixels), device, repeats)
    return {"batch_images": batch, "candidates_per_image": candidates, "new_tokens": new_tokens,
            "seconds_per_batch": round(seconds, 4), "images_per_s": round(batch / seconds, 3),
            "candidates_per_s": round(batch * candidates / seconds, 2),
            "vision_qformer_share": round(vision / seconds, 4)}


def per_candidate_peer(model, device, dtype, candidates: int, new_tokens: int) -> dict:
    """The peer: one generate per image per candidate (image tower re-run every time)."""
    pixels = torch.randn(1, 3, 224, 224, device=device, dtype=dtype)

    def loop():
        for _ in range(candidates):
            model.generate(pixel_values=pixels, do_sample=True, top_p=0.95, top_k=50, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens)

    seconds = timed(loop, device, 1)
    return {"candidates": candidates, "new_tokens": new_tokens, "candidates_per_s": round(candidates / seconds, 2)}


@torch.inference_mode()
def ranker_rates(device, dtype, tiny: bool, batch: int, repeats: int) -> dict:
    vision_cfg, text_cfg = VIT_H_14
    if tiny:
        vision_cfg, text_cfg = {**vision_cfg, **TINY_VISION}, {**text_cfg, **TINY_VISION}
    with torch.device(device):
        vision = CLIPVisionModel(CLIPVisionConfig(**vision_cfg)).to(dtype).eval()
        text = CLIPTextModel(CLIPTextConfig(**text_cfg)).to(dtype).eval()
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    tokens = torch.randint(0, 1000, (batch, 77), device=device)
    t_img = timed(lambda: vision(pixel_values=images), device, repeats)
    t_txt = timed(lambda: text(input_ids=tokens), device, repeats)
    return {"model": "ViT-H-14 shapes (transformers CLIP towers)", "batch": batch,
            "images_per_s": round(batch / t_img, 1), "texts_per_s": round(batch / t_txt, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy shapes on CPU (checks the script, measures nothing)")
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--new-tokens", default="50,16", help="forced generated tokens per candidate")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--peer-candidates", type=int, default=4)
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in bf16, directly on the GPU
    with torch.device(device):
        model = Blip2ForConditionalGeneration(blip2(args.tiny)).eval()
    torch.set_default_dtype(previous)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
           "torch": torch.__version__, "params_billion": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
           "build_seconds": round(time.perf_counter() - start, 1), "weights": "random (shapes only)", "caption": []}
    with torch.inference_mode():
        for new_tokens in [int(x) for x in args.new_tokens.split(",")]:
            for batch in [int(x) for x in args.batch_sizes.split(",")]:
                out["caption"].append(caption_rates(model, device, dtype, batch, args.candidates, new_tokens,
                                                    args.repeats))
                print(json.dumps(out["caption"][-1]), flush=True)
        out["peer_one_generate_per_candidate"] = per_candidate_peer(
            model, device, dtype, args.peer_candidates, int(args.new_tokens.split(",")[0]))
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    del model
    out["ranker_a"] = ranker_rates(device, dtype, args.tiny, 8 if args.tiny else 256, args.repeats)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
