"""FP8 attention with cuDNN on Hopper at CogVideoX's shapes: is it supported, how accurate, how fast?

    pip install --no-index --no-deps --target /tmp/site .whl-cudnn/*.whl
    PYTHONPATH=/tmp/site python3 benchmarks/probe_fp8_attention.py --out $OUT/fp8_attention.json [--quick]

Joint text+video self-attention, batch 1, no mask, 226 + 13*30*45 = 17776 tokens (--quick: 4096): CogVideoX-2B
(30 heads, d 64), 5B (48 heads, d 64), and 15 heads at d 128 (the 2B's FLOPs: is only d 64 refused?). Per shape,
through nvidia-cudnn-frontend's `sdpa_fp8` / `sdpa_fp8_backward` (called as its test/python/sdpa/fp8.py does):
1. build the E4M3 forward and backward graphs; a refusal is recorded with cuDNN's message, not raised;
2. accuracy against bf16 torch SDPA (Flash backend) on the same bf16 inputs, random normal and with q, k x 3:
   ||x - ref|| / ||ref|| and cosine of O, dQ, dK, dV (random dO); bf16 cuDNN vs Flash is the noise floor. Inputs
   are quantized per tensor at 448 / amax. Hopper writes O and dQ/dK/dV only in FP8: their scales come from the
   bf16 reference's amax with 1.25x headroom; S takes the documented bound (scale 448); dP's scale comes from the
   amax_dP that a first backward at scale 1 reports (what delayed scaling would feed back);
3. time (CUDA events, 3 warm-ups, median of 10) the FP8 graph executions (quantizing q, k, v timed apart) against
   bf16 SDPA forward and forward+backward on the cuDNN and Flash backends, with TFLOP/s (forward 4*b*h*s*s*d,
   backward 2.5x). Tables are printed; --out gets JSON, rewritten after every shape. Installs nothing.
"""

import argparse
import json
import math
import platform
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cudnn
from check_attention import timed  # CUDA events: 3 warm-ups, the median of 10

E4M3, FP8_MAX, OUT_HEADROOM = torch.float8_e4m3fn, 448.0, 1.25
TOKENS = 226 + 13 * 30 * 45
SHAPES = (("2b h30 d64", 30, 64), ("5b h48 d64", 48, 64), ("h15 d128 (2b flops)", 15, 128))
FWD_NAMES = ("q", "k", "v", "descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o",
             "o", "stats", "amax_s", "amax_o")
BWD_NAMES = ("q", "k", "v", "o", "dO", "stats", "descale_q", "descale_k", "descale_v", "descale_o", "descale_dO",
             "descale_s", "descale_dP", "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP",
             "dQ", "dK", "dV", "amax_dQ", "amax_dK", "amax_dV", "amax_dP")
FWD_UID = {n: i + 1 for i, n in enumerate(FWD_NAMES)}
BWD_UID = {n: i + 101 for i, n in enumerate(BWD_NAMES)}
BACKENDS = (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION))
RECIPE = {"q k v dO": "E4M3, per tensor, scale 448 / amax", "S": "scale 448 (amax_s <= 1)",
          "O dQ dK dV": "E4M3, scale 448 / (1.25 * bf16 reference amax)",
          "dP": "scale 448 / (1.25 * amax_dP reported by a run at scale 1)", "reference": "bf16 torch SDPA, Flash"}


def bshd_stride(b, h, s, d):
    """Strides of a (b, h, s, d) view of (b, s, h, d) memory: CogVideoX's projections give that layout."""
    return (s * h * d, d, h * d, 1)


def scalar_tensor(g, uid):
    return g.tensor(uid=uid, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.FLOAT)


def mark_output(t, uid, dim, stride, data_type):
    t.set_uid(uid).set_output(True).set_dim(dim).set_stride(stride).set_data_type(data_type)


def forward_graph(handle, b, h, s, d):
    fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    t = {n: g.tensor(uid=FWD_UID[n], dim=(b, h, s, d), stride=bshd_stride(b, h, s, d), data_type=fp8)
         for n in ("q", "k", "v")}
    t.update({n: scalar_tensor(g, FWD_UID[n]) for n in FWD_NAMES[3:9]})
    o, stats, amax_s, amax_o = g.sdpa_fp8(**t, generate_stats=True, attn_scale=1.0 / math.sqrt(d))
    mark_output(o, FWD_UID["o"], (b, h, s, d), bshd_stride(b, h, s, d), fp8)  # FP8 O: bf16 O is Blackwell-only
    mark_output(stats, FWD_UID["stats"], (b, h, s, 1), (h * s, s, 1, 1), f32)
    mark_output(amax_s, FWD_UID["amax_s"], (1, 1, 1, 1), (1, 1, 1, 1), f32)
    mark_output(amax_o, FWD_UID["amax_o"], (1, 1, 1, 1), (1, 1, 1, 1), f32)
    return g


def backward_graph(handle, b, h, s, d):
    fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    t = {n: g.tensor(uid=BWD_UID[n], dim=(b, h, s, d), stride=bshd_stride(b, h, s, d), data_type=fp8)
         for n in ("q", "k", "v", "o", "dO")}
    t["stats"] = g.tensor(uid=BWD_UID["stats"], dim=(b, h, s, 1), stride=(h * s, s, 1, 1), data_type=f32)
    t.update({n: scalar_tensor(g, BWD_UID[n]) for n in BWD_NAMES[6:18]})
    outputs = g.sdpa_fp8_backward(**t, attn_scale=1.0 / math.sqrt(d), use_deterministic_algorithm=False)
    for name, out in zip(BWD_NAMES[18:], outputs):
        if name.startswith("amax"):
            mark_output(out, BWD_UID[name], (1, 1, 1, 1), (1, 1, 1, 1), f32)
        else:  # FP8 gradients: bf16 dQ/dK/dV is Blackwell-only
            mark_output(out, BWD_UID[name], (b, h, s, d), bshd_stride(b, h, s, d), fp8)
    return g


def build(make_graph):
    """(graph, workspace, record); graph is None and record says where and why when cuDNN refuses."""
    rec, stage = {"supported": False}, "construct"
    try:
        g = make_graph()
        for stage, step in (("validate", g.validate), ("build_operation_graph", g.build_operation_graph),
                            ("create_execution_plans",
                             lambda: g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])),
                            ("check_support", g.check_support), ("build_plans", g.build_plans)):
            step()
        stage = "workspace"
        workspace = torch.empty(g.get_workspace_size(), dtype=torch.uint8, device="cuda")
    except Exception as exc:  # cudnnGraphNotSupportedError or any other refusal
        rec.update(stage=stage, error=f"{type(exc).__name__}: {exc}")
        return None, None, rec
    rec.update(supported=True, workspace_bytes=workspace.numel(),
               engine="cudnn backend" if g.selected_engine is None else g.selected_engine.name)
    try:
        rec["plan"] = g.get_plan_name_at_index(getattr(g, "_plan_index", 0))
    except Exception as exc:
        rec["plan"] = f"unknown ({exc})"
    return g, workspace, rec


def quantize(x):
    """(E4M3 copy of x in its own layout, descale as a 1-element fp32 tensor); stays on the device."""
    scale = FP8_MAX / x.detach().abs().amax().float().clamp(min=1e-12)
    return (x.detach().float() * scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3), (1.0 / scale).reshape(1)


def out_scale(amax):
    """Scale of a tensor cuDNN writes in FP8, from an amax it may exceed a little: 448 / (1.25 amax)."""
    return FP8_MAX / (OUT_HEADROOM * max(amax, 1e-12))


def scalar(value):
    return torch.tensor([value], dtype=torch.float32, device="cuda")


def bhsd(x):
    return x.transpose(1, 2)


def compare(x, ref):
    x, ref = x.double().flatten(), ref.double().flatten()
    return {"rel_err": ((x - ref).norm() / ref.norm()).item(),
            "cos": (torch.dot(x, ref) / (x.norm() * ref.norm())).item(), "finite": bool(torch.isfinite(x).all())}


def torch_attention(q, k, v, dO, backend):
    """bf16 SDPA output and gradients, (b, s, h, d) like the inputs."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with sdpa_kernel(backend):
        o = F.scaled_dot_product_attention(*(bhsd(x) for x in leaves))
    o.backward(bhsd(dO))
    return [bhsd(o).detach()] + [x.grad for x in leaves]


def fp8_forward(graph, workspace, handle, q, k, v, o_amax):
    """Quantize, run the FP8 forward; the named buffers (the variant pack) are returned for reuse."""
    b, s, h, d = q.shape
    bufs = {}
    for name, x in (("q", q), ("k", k), ("v", v)):
        bufs[name], bufs["descale_" + name] = quantize(x)
    o_scale = out_scale(o_amax)
    bufs.update(descale_s=scalar(1.0 / FP8_MAX), scale_s=scalar(FP8_MAX), scale_o=scalar(o_scale),
                descale_o=scalar(1.0 / o_scale), o=torch.empty(b, s, h, d, dtype=E4M3, device="cuda"),
                stats=torch.empty(b, h, s, 1, dtype=torch.float32, device="cuda"),
                amax_s=scalar(math.nan), amax_o=scalar(math.nan))
    pack = {FWD_UID[n]: (bhsd(bufs[n]) if n in ("q", "k", "v", "o") else bufs[n]) for n in FWD_NAMES}
    graph.execute(pack, workspace, handle=handle)
    return bufs, pack


def fp8_backward(graph, workspace, handle, fwd, dO, grad_amax):
    """Run the FP8 backward twice: at dP scale 1 to read amax_dP, then at 448 / amax_dP."""
    b, s, h, d = dO.shape
    bufs = {n: fwd[n] for n in ("q", "k", "v", "o", "stats", "descale_q", "descale_k", "descale_v", "descale_o",
                                "descale_s", "scale_s")}
    bufs["dO"], bufs["descale_dO"] = quantize(dO)
    bufs.update(descale_dP=scalar(1.0), scale_dP=scalar(1.0))
    for name, amax in zip(("dQ", "dK", "dV"), grad_amax):
        bufs["scale_" + name] = scalar(out_scale(amax))
        bufs[name] = torch.empty(b, s, h, d, dtype=E4M3, device="cuda")
        bufs["amax_" + name] = scalar(math.nan)
    bufs["amax_dP"] = scalar(math.nan)
    pack = {BWD_UID[n]: (bhsd(bufs[n]) if n in ("q", "k", "v", "o", "dO", "dQ", "dK", "dV") else bufs[n])
            for n in BWD_NAMES}
    graph.execute(pack, workspace, handle=handle)
    amax_dp = bufs["amax_dP"].item()  # at scale 1, pre- and post-scale amax agree
    scale_dp = out_scale(amax_dp) if math.isfinite(amax_dp) and amax_dp > 0 else 1.0
    bufs["scale_dP"].fill_(scale_dp)
    bufs["descale_dP"].fill_(1.0 / scale_dp)
    graph.execute(pack, workspace, handle=handle)
    return bufs, pack, amax_dp


def accuracy(built, handle, heads, d, seq, qk_mult, seed):
    (gf, wf), (gb, wb) = built
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dO = (torch.randn(1, seq, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(4))
    q, k = q * qk_mult, k * qk_mult
    ref = torch_attention(q, k, v, dO, SDPBackend.FLASH_ATTENTION)
    names = ("o", "dq", "dk", "dv")
    rec = {"qk_mult": qk_mult}
    try:  # the noise floor: two bf16 kernels against each other
        noise = torch_attention(q, k, v, dO, SDPBackend.CUDNN_ATTENTION)
        rec["bf16_cudnn_vs_flash"] = {n: compare(x, r) for n, x, r in zip(names, noise, ref)}
        del noise
    except Exception as exc:
        rec["bf16_cudnn_vs_flash"] = {"error": f"{type(exc).__name__}: {exc}"}
    ref_amax = [x.abs().amax().float().item() for x in ref]
    rec["ref_amax"] = dict(zip(names, ref_amax))
    fwd, _ = fp8_forward(gf, wf, handle, q, k, v, ref_amax[0])
    rec["fp8_o"] = compare(fwd["o"].float() * fwd["descale_o"], ref[0])
    rec["cudnn_amax_s"], rec["cudnn_amax_o"] = fwd["amax_s"].item(), fwd["amax_o"].item()
    if gb is not None:
        bwd, _, rec["cudnn_amax_dP_at_scale_1"] = fp8_backward(gb, wb, handle, fwd, dO, ref_amax[1:])
        for name, r in zip(("dQ", "dK", "dV"), ref[1:]):
            rec["fp8_" + name.lower()] = compare(bwd[name].float() / bwd["scale_" + name], r)
            rec["cudnn_amax_" + name] = bwd["amax_" + name].item()
    return rec


def timing(built, handle, heads, d, seq):
    (gf, wf), (gb, wb) = built
    q, k, v, dO = (torch.randn(1, seq, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    fwd_flops = 4.0 * heads * seq * seq * d
    ms = {"fp8_quantize_qkv": timed(lambda: [quantize(x) for x in (q, k, v)])}
    if gf is not None:
        fwd, fpack = fp8_forward(gf, wf, handle, q, k, v, 1.0)
        ms["fp8_fwd"] = timed(lambda: gf.execute(fpack, wf, handle=handle))
        if gb is not None:
            _, bpack, _ = fp8_backward(gb, wb, handle, fwd, dO, (1.0, 1.0, 1.0))
            ms["fp8_bwd"] = timed(lambda: gb.execute(bpack, wb, handle=handle))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    errors = {}
    for name, backend in BACKENDS:
        def forward_only():
            with torch.no_grad(), sdpa_kernel(backend):
                F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v))

        def forward_backward():
            for x in leaves:
                x.grad = None
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(*(bhsd(x) for x in leaves)).backward(bhsd(dO))

        try:
            ms[f"bf16_{name}_fwd"] = timed(forward_only)
            ms[f"bf16_{name}_fwd_bwd"] = timed(forward_backward)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    if "fp8_bwd" in ms:
        ms["fp8_fwd_plus_bwd"] = ms["fp8_fwd"] + ms["fp8_bwd"]
    tflops = {key: work_multiple(key) * fwd_flops / (t * 1e9) for key, t in ms.items() if key != "fp8_quantize_qkv"}
    return {"ms": ms, "tflops": tflops, "errors": errors}


def work_multiple(key):
    """FLOPs of a timed pass in units of the forward's: backward 2.5, forward + backward 3.5."""
    if key.endswith(("_fwd_bwd", "_fwd_plus_bwd")):
        return 3.5
    return 2.5 if key.endswith("_bwd") else 1.0


def probe_shape(handle, label, heads, d, seq):
    rec = {"label": label, "batch": 1, "heads": heads, "seq": seq, "head_dim": d,
           "fwd_flops": 4.0 * heads * seq * seq * d}
    gf, wf, rec["fwd_graph"] = build(lambda: forward_graph(handle, 1, heads, seq, d))
    gb, wb, rec["bwd_graph"] = build(lambda: backward_graph(handle, 1, heads, seq, d))
    built = ((gf, wf), (gb, wb) if gf is not None else (None, None))
    for variant, mult in (("randn", 1.0), ("qk_x3", 3.0)):
        try:
            rec[variant] = accuracy(built, handle, heads, d, seq, mult, seed=0) if gf is not None else None
        except Exception as exc:
            rec[variant] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    try:
        rec["timing"] = timing(built, handle, heads, d, seq)
    except Exception as exc:
        rec["timing"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    torch.cuda.empty_cache()
    return rec


def print_tables(results):
    print(f"\n{'shape':22} {'fwd':>4} {'bwd':>4} | ms (TFLOP/s):  fp8 fwd | fp8 bwd | cudnn fwd | flash fwd"
          f" | fp8 f+b | cudnn f+b | flash f+b")
    for r in results:
        t = r.get("timing", {})
        ms, tf = t.get("ms", {}), t.get("tflops", {})
        cells = [f"{ms[k]:7.2f} ({tf[k]:4.0f})" if k in ms else f"{'-':>14}" for k in (
            "fp8_fwd", "fp8_bwd", "bf16_cudnn_fwd", "bf16_flash_fwd", "fp8_fwd_plus_bwd", "bf16_cudnn_fwd_bwd",
            "bf16_flash_fwd_bwd")]
        sup = ["yes" if r[g]["supported"] else "no" for g in ("fwd_graph", "bwd_graph")]
        print(f"{r['label']:22} {sup[0]:>4} {sup[1]:>4} | " + " | ".join(cells))
    print(f"\n{'shape':22} {'inputs':7} | rel err / cos vs bf16 flash:  fp8 O | fp8 dQ | fp8 dK | fp8 dV"
          f" || bf16 cudnn O | dQ")
    for r in results:
        for variant in ("randn", "qk_x3"):
            a = r.get(variant) or {}
            cells = [f"{a[k]['rel_err']:.4f}/{a[k]['cos']:.5f}" if k in a else "-"
                     for k in ("fp8_o", "fp8_dq", "fp8_dk", "fp8_dv")]
            noise = a.get("bf16_cudnn_vs_flash", {})
            cells += [f"{noise[k]['rel_err']:.4f}" if k in noise else "-" for k in ("o", "dq")]
            print(f"{r['label']:22} {variant:7} | " + " | ".join(cells) + ("  " + a["error"] if "error" in a else ""))
    for r in results:
        for g in ("fwd_graph", "bwd_graph"):
            if not r[g]["supported"]:
                print(f"{r['label']} {g} refused at {r[g]['stage']}: {r[g]['error'][:400]}")


def environment():
    props = torch.cuda.get_device_properties(0)
    return {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "torch_cudnn": torch.backends.cudnn.version(), "cudnn_frontend": cudnn.__version__,
            "cudnn_backend": cudnn.backend_version(), "cudnn_backend_string": cudnn.backend_version_string(),
            "gpu": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fp8_attention.json", help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="4096 tokens instead of 17776")
    args = parser.parse_args()
    seq = 4096 if args.quick else TOKENS
    report = {"environment": environment(), "seq": seq, "quick": args.quick, "recipe": RECIPE, "shapes": []}
    print(json.dumps(report["environment"]))
    handle = cudnn.create_handle()
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    for label, heads, d in SHAPES:
        print(f"-- {label}: 1 x {heads} heads x {seq} tokens x d {d}", flush=True)
        try:
            report["shapes"].append(probe_shape(handle, label, heads, d, seq))
        except Exception as exc:  # per-shape failures stay per shape
            failed = {"supported": False, "stage": "probe", "error": f"{type(exc).__name__}: {exc}"}
            report["shapes"].append({"label": label, "fwd_graph": failed, "bwd_graph": failed,
                                     "traceback": traceback.format_exc()})
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print_tables(report["shapes"])
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
