"""Side-by-side timing of the fused LM-head GRPO loss benchmark's rows, interleaved (each implementation once per
round), for ratios that a busy machine's drift does not skew: ``python bench/flp_side_by_side.py T H V [PASS]``
(PASS: ``forward`` or ``forward+backward``, the default). Prints a markdown table of medians over 5 rounds."""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRITON_INTERPRET", "1")  # as bench/conftest.py: kernels defined for CPU tensors

import test_fused_linear_logprobs as B  # noqa: E402
import torch  # noqa: E402


def main(T: int, H: int, V: int, pass_: str = "forward+backward", rounds: int = 5) -> str:
    fns = {
        "chunked GEMMs (floor)": B._gemms(T, H, V, pass_),
        "r4b_fast policy_loss (torch)": B._make(B._policy_loss("torch"), T, H, V, pass_),
        "r4b_fast logprobs (torch)": B._make(B._logprobs("torch"), T, H, V, pass_),
        "bare matmul unchunked": B._matmul(T, H, V, pass_),
        "eager": B._make(B._eager, T, H, V, pass_),
    }
    try:
        fns["liger (compiled=False)"] = B._make(B._liger(), T, H, V, pass_)
    except ImportError:
        pass
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            B.sync()
            times[k].append(time.perf_counter() - start)
    floor = statistics.median(times["chunked GEMMs (floor)"])
    lines = [f"T={T} H={H} V={V} {pass_}, torch threads {torch.get_num_threads()}",
             "| impl | median s | min s | ratio to floor (median) |", "|---|---|---|---|"]
    for k, v in times.items():
        lines.append(f"| {k} | {statistics.median(v):.3f} | {min(v):.3f} | {statistics.median(v) / floor:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    print(main(int(args[0]), int(args[1]), int(args[2]), *(args[3:4] or [])))
