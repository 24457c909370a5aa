"""Memory/scale plan for distilling SD3-medium and Flux-dev sized transformers (issue 15).

Builds each transformer on the **meta device** from its public config (no weights, no download),
counts parameters exactly (base, LoRA on the attention projections at rank 16/64, the two-time
student's second time embedding), and *measures* the activations autograd keeps for backward by
running the whole model forward on meta tensors in bf16 at the real sequence (1024² → 4096 image
tokens + the pipeline's text tokens) under ``torch.autograd.graph.saved_tensors_hooks``: every saved
tensor is attributed to the block running at the time, de-duplicated by storage, parameters
excluded. Attention is accounted as flash / memory-efficient attention saves it on a GPU (q, k, v,
the output and the float32 row log-sum-exp; no N×N matrix): meta tensors would otherwise take the
math path. ``--validate`` checks the meta accounting against a real float32 CPU run of one
full-width block of each kind (SD3 joint, Flux double- and single-stream) at a small sequence (CPU
SDPA is a flash kernel too): the byte counts must agree.

Per-setting memory (bytes per parameter): frozen bf16 weights 2; a trained parameter 16 (LoRA:
fp32 weight 4 + fp32 grad 4 + Adam m, v 8; full fine-tune in bf16 with an fp32 master copy: bf16
weight 2 + bf16 grad 2 + master 4 + m, v 8). LoRA students share the frozen base with the teacher
(adapters disabled = teacher) and FreeFlow's fake net is a second LoRA on the same base; a full
student needs its own copy beside the frozen bf16 teacher, and FreeFlow's fake net is another full
trained copy. Activations: with gradient checkpointing, each block's inputs plus one block's full
activations (recomputed during its backward) plus everything outside the blocks; without it, every
saved tensor. One "graph" is one student call with grad; FreeFlow holds two (prediction with a
finite-difference ∂δF, correction), plain velocity regression / reflow one. FSDP over 8 GPUs
shards weights, grads and optimizer states (ZeRO-3) and adds two gathered blocks per sharded net
(current + prefetch). Not counted: the CUDA context, cuBLAS workspaces and allocator fragmentation
(``--reserve-gib``, an estimate) and the transient gradients of one block's activations.

Run (CPU, about a minute): ``python scripts/pipeline_memory_plan.py --validate --write-docs``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

GIB = 1024**3

# transformer/config.json of stabilityai/stable-diffusion-3-medium-diffusers (model card: 2B MMDiT)
SD3_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
              "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
              "caption_projection_dim": 1536,
              "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192}
# transformer/config.json of black-forest-labs/FLUX.1-dev (model card: 12B rectified-flow transformer)
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}

# name -> (diffusers class, config, text tokens, pooled width); text tokens: SD3 pipeline 77 CLIP + 256 T5
# (max_sequence_length=256), Flux pipeline 512 T5 (max_sequence_length=512)
MODELS = {
    "SD3-medium": ("SD3Transformer2DModel", SD3_MEDIUM, 77 + 256, 2048),
    "Flux-dev": ("FluxTransformer2DModel", FLUX_DEV, 512, 768),
}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # flowdistill.integrations.diffusers.lora.DEFAULT_TARGETS
IMAGE = 1024  # pixels; VAE factor 8 -> 128² latents, 2×2 patches -> 4096 tokens


# -- attention as a GPU flash kernel keeps it ---------------------------------------------------
class _FlashSaved(torch.autograd.Function):
    """Stand-in for fused attention on meta tensors: output of q's shape; saves (q, k, v, out, lse)
    as flash attention does (lse: float32 [B, H, N])."""

    @staticmethod
    def forward(ctx, q, k, v):  # noqa: D102
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        raise RuntimeError("accounting only")


@contextlib.contextmanager
def flash_accounting():
    """Route ``F.scaled_dot_product_attention`` on meta tensors through :class:`_FlashSaved`."""
    real = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if query.device.type != "meta":
            return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kw)
        if attn_mask is not None:
            raise ValueError("accounting assumes no attention mask")
        return _FlashSaved.apply(query, key, value)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


# -- saved-tensor meter -------------------------------------------------------------------------
def _sid(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensorMeter:
    """Bytes of tensors saved for backward, per phase ("outside" or a block index), each storage once,
    parameters and buffers excluded. ``inputs[i]``: bytes of block ``i``'s hidden-state inputs (what
    gradient checkpointing keeps)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]):
        self.skip = {_sid(p) for p in model.parameters()} | {_sid(b) for b in model.buffers()}
        self.seen: set[int] = set()
        self.keep: list[torch.Tensor] = []
        self.phase: str | int = "outside"
        self.bytes: dict[str | int, int] = {"outside": 0}
        self.inputs: dict[int, int] = {}
        self.handles = []
        for i, blk in enumerate(blocks):
            self.handles.append(blk.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(blk.register_forward_hook(self._post))

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            self.phase = i
            self.bytes.setdefault(i, 0)
            hs = [kwargs.get("hidden_states", args[0] if args else None),
                  kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)]
            self.inputs[i] = sum(t.numel() * t.element_size() for t in hs if isinstance(t, torch.Tensor))
        return hook

    def _post(self, module, args, out):
        self.phase = "outside"

    def pack(self, t: torch.Tensor):
        """saved_tensors_hooks pack: count a new non-parameter storage once."""
        sid = _sid(t)
        if sid not in self.skip and sid not in self.seen:
            self.seen.add(sid)
            self.bytes[self.phase] = self.bytes.get(self.phase, 0) + t.untyped_storage().nbytes()
        self.keep.append(t)  # keep storages alive so their ids stay unique
        return t

    def close(self) -> None:
        """Remove the block hooks."""
        for h in self.handles:
            h.remove()


# -- models -------------------------------------------------------------------------------------
def build_meta(name: str) -> nn.Module:
    """The transformer of ``name`` on the meta device (random-free, instant)."""
    import diffusers

    cls_name, cfg, _, _ = MODELS[name]
    with torch.device("meta"):
        return getattr(diffusers, cls_name)(**cfg)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in call order (Flux: double-stream, then single-stream)."""
    out = list(model.transformer_blocks)
    out += list(getattr(model, "single_transformer_blocks", []))
    return out


def _lora_match(name: str, targets=LORA_TARGETS) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_param_count(model: nn.Module, rank: int) -> int:
    """``Σ r·(in + out)`` over the Linear layers peft would adapt for ``LORA_TARGETS``."""
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and _lora_match(n))


def second_time_param_count(model: nn.Module) -> int:
    """Parameters of the two-time student's ``TimestepEmbedding(256 → D)`` (two_time.py)."""
    d = model.time_text_embed.timestep_embedder.linear_2.out_features
    c = model.time_text_embed.time_proj.num_channels
    return c * d + d + d * d + d


def inputs_of(name: str, batch: int, dtype=torch.bfloat16, image: int = IMAGE) -> dict:
    """Meta inputs of a 1024² call (latents, text, pooled, timestep; Flux ids and guidance)."""
    cls_name, cfg, txt, pooled = MODELS[name]
    h = w = image // 8
    meta = {"device": "meta", "dtype": dtype}
    kw = {"encoder_hidden_states": torch.empty(batch, txt, cfg["joint_attention_dim"], **meta),
          "pooled_projections": torch.empty(batch, pooled, **meta),
          "timestep": torch.empty(batch, device="meta", dtype=dtype), "return_dict": False}
    if cls_name == "FluxTransformer2DModel":
        n = (h // 2) * (w // 2)
        kw["hidden_states"] = torch.empty(batch, n, cfg["in_channels"], **meta)
        kw["img_ids"] = torch.zeros(n, 3, device="meta")
        kw["txt_ids"] = torch.zeros(txt, 3, device="meta")
        kw["guidance"] = torch.empty(batch, device="meta")
    else:
        kw["hidden_states"] = torch.empty(batch, cfg["in_channels"], h, w, **meta)
    return kw


def measure(name: str, mode: str, batch: int) -> dict:
    """Saved-activation bytes of one forward with grad (bf16, meta, full sequence): ``outside``,
    per-block ``internal`` and ``inputs``; ``mode`` is ``full`` (all weights trained) or ``lora``."""
    model = build_meta(name).to(torch.bfloat16)
    if mode == "lora":
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=list(LORA_TARGETS)))
    blocks = blocks_of(model)
    meter = SavedTensorMeter(model, blocks)
    with flash_accounting(), torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
        out = model(**inputs_of(name, batch))[0]
    assert out.requires_grad
    meter.close()
    internal = [meter.bytes.get(i, 0) for i in range(len(blocks))]
    inputs = [meter.inputs[i] for i in range(len(blocks))]
    return {"outside": meter.bytes["outside"], "internal": internal, "inputs": inputs,
            "no_ckpt": meter.bytes["outside"] + sum(internal),
            "ckpt": meter.bytes["outside"] + sum(inputs) + max(internal)}


# block kind -> (heads, head_dim) of the full-width model it comes from
VALIDATE_KINDS = {"sd3": (SD3_MEDIUM["num_attention_heads"], SD3_MEDIUM["attention_head_dim"]),
                  "flux_double": (FLUX_DEV["num_attention_heads"], FLUX_DEV["attention_head_dim"]),
                  "flux_single": (FLUX_DEV["num_attention_heads"], FLUX_DEV["attention_head_dim"])}


def _rope_axes(head_dim: int) -> list[int]:
    """Flux's rotary axes for ``head_dim`` (``[16, 56, 56]`` at 128: an eighth, then halves of the rest)."""
    a = head_dim // 16 * 2
    b = (head_dim - a) // 4 * 2
    return [a, b, head_dim - a - b]


def validate_against_cpu(kind: str = "sd3", n_img: int = 64, n_txt: int = 32, heads: int | None = None,
                         head_dim: int | None = None) -> tuple[int, int]:
    """Saved bytes of one block (``kind``: ``sd3``, ``flux_double``, ``flux_single``; full width of
    SD3-medium / Flux-dev unless ``heads``/``head_dim`` say otherwise), float32, sequence
    ``n_img + n_txt``: a real CPU forward (CPU SDPA = flash kernel) vs the meta accounting.
    Returns (cpu, meta)."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import (
        FluxPosEmbed,
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    h0, hd0 = VALIDATE_KINDS[kind]
    heads, head_dim = heads or h0, head_dim or hd0
    d = heads * head_dim
    counts = []
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        kw = {}
        with torch.device(device):
            if kind == "sd3":
                blk = JointTransformerBlock(dim=d, num_attention_heads=heads, attention_head_dim=head_dim)
            else:
                cls = FluxTransformerBlock if kind == "flux_double" else FluxSingleTransformerBlock
                blk = cls(dim=d, num_attention_heads=heads, attention_head_dim=head_dim)
            x, c, temb = torch.randn(1, n_img, d), torch.randn(1, n_txt, d), torch.randn(1, d)
        if kind != "sd3":
            ids = torch.cat([torch.zeros(n_txt, 3), torch.arange(n_img)[:, None].repeat(1, 3).float()])
            rope = FluxPosEmbed(10000, _rope_axes(head_dim))(ids)
            kw["image_rotary_emb"] = tuple(r.to(device) for r in rope)
        meter = SavedTensorMeter(blk, [])
        with flash_accounting(), torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            out = blk(x, c, temb, **kw)
        assert out[1].requires_grad
        counts.append(meter.bytes["outside"])
    return counts[0], counts[1]


# -- the plan -----------------------------------------------------------------------------------
def plan(name: str, acts: dict, gpu_gib: float, reserve_gib: float) -> tuple[dict, list[dict]]:
    """Parameter counts and per-setting memory rows for ``name`` given measured activations
    ``acts[(mode, batch)]``."""
    model = build_meta(name)
    p = sum(q.numel() for q in model.parameters())
    blocks = blocks_of(model)
    block_max = max(sum(q.numel() for q in b.parameters()) for b in blocks)
    two = second_time_param_count(model)
    counts = {"params": p, "lora16": lora_param_count(model, 16), "lora64": lora_param_count(model, 64),
              "second_time": two, "largest_block": block_max}
    rows = []
    settings = [("LoRA r16", "lora", counts["lora16"]), ("LoRA r64", "lora", counts["lora64"]),
                ("full", "full", p), ("full + FSDP-8", "full", p)]
    for label, mode, trained in settings:
        for method, graphs, nets in (("1 graph", 1, 1), ("FreeFlow", 2, 2)):
            # frozen bf16 base (LoRA: shared by teacher, student and fake; full: the teacher) + the
            # trained student (its second time embedding too) + FreeFlow's one-time fake net
            static = 2 * p + 16 * (trained + two) + 16 * trained * (nets - 1)
            fsdp = label.endswith("FSDP-8")
            if fsdp:
                static = static / 8 + 2 * block_max * 2 * (1 + nets)  # 2 gathered blocks per net
            row = {"model": name, "setting": label, "method": method, "static_gib": static / GIB}
            for b in (1, 4):
                for ck in ("ckpt", "no_ckpt"):
                    total = static + graphs * acts[(mode, b)][ck]
                    row[f"b{b}_{ck}_gib"] = total / GIB
                    row[f"b{b}_{ck}_fits"] = total / GIB + reserve_gib <= gpu_gib
            rows.append(row)
    return counts, rows


def _g(x: float) -> str:
    return f"{x:.1f}"


def _fit(row: dict, b: int, ck: str) -> str:
    return f"{_g(row[f'b{b}_{ck}_gib'])} {'✓' if row[f'b{b}_{ck}_fits'] else '✗'}"


def markdown(results: dict, gpu_gib: float, reserve_gib: float, command: str, validation,
             seconds: float) -> str:
    """The docs section (tables + command)."""
    out = ["<!-- memory-plan:start (written by scripts/pipeline_memory_plan.py; do not edit by hand) -->",
           "## Memory and scale plan: SD3-medium and Flux-dev", "",
           f"Command (CPU, {seconds:.0f} s): `{command}`", "",
           "Parameter counts are **exact** (models built on the meta device from the public "
           "`transformer/config.json` of stabilityai/stable-diffusion-3-medium-diffusers and "
           "black-forest-labs/FLUX.1-dev, numbers in the script). Activations are **measured**: the "
           "whole transformer runs forward in bf16 on meta tensors at the real 1024² sequence (4096 image "
           "tokens + 333 SD3 / 512 Flux text tokens), and every tensor autograd saves for backward is "
           "counted once (attention as a flash kernel keeps it: q, k, v, output, fp32 log-sum-exp). "
           "Optimizer and weight memory is **computed** (16 B per trained parameter, 2 B per frozen bf16 "
           "one; see the script's docstring). With gradient checkpointing the activations are each block's "
           "inputs + one block recomputed + the non-block layers.", ""]
    if validation is not None:
        parts = [f"{kind} {cpu / 2**20:.2f} / {meta / 2**20:.2f} MiB "
                 f"({'equal' if cpu == meta else 'DIFFERENT'})" for kind, (cpu, meta) in validation.items()]
        out += ["Check of the accounting: one full-width block of each kind (float32, 64 + 32 tokens), bytes "
                "saved on a real CPU forward / on meta: " + "; ".join(parts) + ".", ""]
    out += ["| model | parameters | LoRA r16 | LoRA r64 | second time embedding |", "|---|---|---|---|---|"]
    for name, r in results.items():
        c = r["counts"]
        out.append(f"| {name} | {c['params']:,} | {c['lora16']:,} | {c['lora64']:,} | {c['second_time']:,} |")
    out += ["", f"LoRA on `{', '.join(LORA_TARGETS)}` (the attention projections `add_lora` adapts by "
            "default; the text-stream `add_*_proj` are left out). The two-time student also trains its "
            "second time embedding (`two_time.py`); FreeFlow's fake net is one-time.", "",
            "Activations of a LoRA student are measured at rank 16 (rank 64 keeps about 1 % more).", "",
            "Activations of one student forward with grad, GiB per graph (\"full\": every weight trained; "
            "\"lora\": frozen base):", "",
            "| model | trained | b=1 no ckpt | b=1 ckpt | b=4 no ckpt | b=4 ckpt |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for mode in ("lora", "full"):
            a = r["acts"]
            cells = [_g(a[(mode, b)][ck] / GIB) for b in (1, 4) for ck in ("no_ckpt", "ckpt")]
            out.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    out += ["", f"Per-GPU total, GiB, and whether it fits one {gpu_gib:.0f} GiB GPU with "
            f"{reserve_gib:.0f} GiB kept for the CUDA context, workspaces and fragmentation (✓ / ✗). "
            "\"1 graph\": velocity regression / reflow (student + frozen teacher); \"FreeFlow\": "
            "prediction + correction graphs and the fake net (a second LoRA on the shared base, or a full "
            "trained copy). FSDP-8: weights, grads and Adam states sharded over 8 GPUs, batch per GPU.", "",
            "| model | student | method | weights + optimizer | b=1 ckpt | b=1 no ckpt | b=4 ckpt "
            "| b=4 no ckpt |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for row in r["rows"]:
            out.append(f"| {name} | {row['setting']} | {row['method']} | {_g(row['static_gib'])} | "
                       f"{_fit(row, 1, 'ckpt')} | {_fit(row, 1, 'no_ckpt')} | {_fit(row, 4, 'ckpt')} | "
                       f"{_fit(row, 4, 'no_ckpt')} |")
    out.append("")
    for name, r in results.items():
        for b in (1, 4):
            ok = [f"{row['setting']} ({row['method']})" for row in r["rows"] if row[f"b{b}_ckpt_fits"]]
            no = [f"{row['setting']} ({row['method']})" for row in r["rows"] if not row[f"b{b}_ckpt_fits"]]
            out.append(f"- {name}, batch {b} per GPU, checkpointing on: fits — {', '.join(ok) or 'none'}; "
                       f"does not fit — {', '.join(no) or 'none'}.")
    out += ["", "Reading: text encoders and the VAE stay off the GPU (prompt-embedding cache; latents are "
            "decoded only to render). Not counted: the transient gradients of one block's activations in "
            "backward, FreeFlow's fake-net update (a separate step with one graph), and a JVP ∂δF "
            "(forward-mode tangents roughly double the prediction graph; the table assumes the finite "
            "difference).", "<!-- memory-plan:end -->"]
    return "\n".join(out) + "\n"


def write_docs(section: str, path: Path) -> None:
    """Replace (or append) the memory-plan section of ``path``."""
    text = path.read_text() if path.exists() else "# Distilling diffusers pipelines\n\n"
    pat = re.compile(r"<!-- memory-plan:start.*?<!-- memory-plan:end -->\n?", re.S)
    text = pat.sub(lambda m: section, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--reserve-gib", type=float, default=3.0)
    ap.add_argument("--validate", action="store_true", help="check the meta accounting on a real CPU block")
    ap.add_argument("--write-docs", nargs="?", const="docs/pipelines.md", default=None, metavar="PATH")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    t0 = time.time()
    validation = {k: validate_against_cpu(k) for k in VALIDATE_KINDS} if args.validate else None
    results = {}
    for name in args.models.split(","):
        if name not in MODELS:
            ap.error(f"--models: unknown {name!r}; choose from {', '.join(MODELS)}")
        acts = {(mode, b): measure(name, mode, b) for mode in ("lora", "full") for b in (1, 4)}
        counts, rows = plan(name, acts, args.gpu_gib, args.reserve_gib)
        results[name] = {"counts": counts, "acts": acts, "rows": rows}
    command = "python scripts/pipeline_memory_plan.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(results, args.gpu_gib, args.reserve_gib, command.strip(), validation, time.time() - t0)
    print(md)
    if args.write_docs:
        write_docs(md, Path(args.write_docs))
    if args.json:
        blob = {n: {"counts": r["counts"], "rows": r["rows"],
                    "acts": {f"{m}_b{b}": {k: v for k, v in a.items() if k in ("ckpt", "no_ckpt", "outside")}
                             for (m, b), a in r["acts"].items()}} for n, r in results.items()}
        if validation is not None:
            blob["validation_bytes"] = {k: {"cpu": c, "meta": m} for k, (c, m) in validation.items()}
        Path(args.json).write_text(json.dumps(blob, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
