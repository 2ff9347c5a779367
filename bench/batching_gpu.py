"""Continuous batching on a GPU with MedGemma 4B's exact shape (random weights, bf16).

One after another (``generate``, batch 1) vs transformers' ContinuousBatchingManager with
N requests at once, same prompts (random ids), greedy, a fixed answer length (an EOS id
random weights never produce). Run on the lent GPU machine:

    python bench/batching_gpu.py --out $OUT/batching_gpu.json
    python bench/batching_gpu.py --smoke --out /tmp/x.json   # tiny config, CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForImageTextToText, GenerationConfig  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

from devstack.tiny_gemma import medgemma_4b_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    args = p.parse_args(argv)
    report: dict[str, object] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        from bench.medgemma_shape_gpu import smoke_config

        config = smoke_config()
        dtype = torch.float32
    else:
        config = medgemma_4b_config()
        dtype = torch.bfloat16
        report["gpu"] = torch.cuda.get_device_name(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()  # type: ignore[no-untyped-call]
    vocab = config.text_config.vocab_size  # type: ignore[union-attr]
    never = vocab - 1  # an EOS that random weights practically never emit
    gen = torch.Generator().manual_seed(0)
    n_max = max(args.concurrency)
    prompts = [
        torch.randint(3, min(vocab - 2, 255_000), (args.prompt_tokens,), generator=gen).tolist()
        for _ in range(n_max)
    ]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    # one at a time
    serial_n = min(8, n_max)
    with torch.inference_mode():
        model.generate(
            torch.tensor([prompts[0]], device=device),
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=never,
            pad_token_id=0,
        )
        sync()
        t0 = time.perf_counter()
        for ids in prompts[:serial_n]:
            model.generate(
                torch.tensor([ids], device=device),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=never,
                pad_token_id=0,
            )
        sync()
    serial_s = time.perf_counter() - t0
    serial_rate = serial_n * args.new_tokens / serial_s
    report["serial"] = {
        "requests": serial_n,
        "seconds": round(serial_s, 3),
        "tokens_per_s": round(serial_rate, 1),
    }
    print(
        f"serial: {serial_n} x {args.new_tokens} tokens in {serial_s:.2f}s = "
        f"{serial_rate:.1f} tok/s",
        flush=True,
    )

    results = []
    for n in args.concurrency:
        try:
            gc = GenerationConfig(  # type: ignore[no-untyped-call]
                max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=never, pad_token_id=0
            )
            cb = (
                ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=512)
                if args.smoke
                else ContinuousBatchingConfig()
            )
            mgr = model.init_continuous_batching(
                generation_config=gc, continuous_batching_config=cb
            )
            mgr.start()
            warm = mgr.add_request(prompts[0], max_new_tokens=4)
            while True:
                out = mgr.get_result(timeout=60)
                if out is None or (out.request_id == warm and out.is_finished()):
                    break
            t0 = time.perf_counter()
            ids = [mgr.add_request(prompts[i], max_new_tokens=args.new_tokens) for i in range(n)]
            done: dict[str, int] = {}
            while len(done) < n:
                out = mgr.get_result(timeout=120)
                if out is None:
                    raise RuntimeError("no result in time")
                if out.is_finished():
                    done[out.request_id] = len(out.generated_tokens)
            dt = time.perf_counter() - t0
            mgr.stop(block=True, timeout=30)
            rate = sum(done.values()) / dt
            row = {
                "concurrency": n,
                "seconds": round(dt, 3),
                "tokens": sum(done.values()),
                "tokens_per_s": round(rate, 1),
                "vs_serial": round(rate / serial_rate, 2),
                "requests": len(ids),
            }
            print(
                f"continuous batching x{n}: {rate:.1f} tok/s ({rate / serial_rate:.2f}x)",
                flush=True,
            )
        except Exception as exc:  # noqa: BLE001 - record and go on: device time is scarce
            traceback.print_exc()
            row = {"concurrency": n, "error": f"{type(exc).__name__}: {exc}"[:300]}
        results.append(row)
        report["continuous_batching"] = results
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
