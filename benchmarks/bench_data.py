"""Data-layer throughput on this machine: ``prepare`` (MB/s of text) and the loader (samples/s).

    python benchmarks/bench_data.py [--mb 8] [--vocab 32000]

Prepares the embedded standard-library corpus twice (byte tokenizer; trained BPE), then times
``BlendedGPTDataset.samples`` at seq 4096 and seq 128 over a two-corpus blend of it, reading whole
global batches in stream order as a trainer does, and compares with a trainer consuming 8 samples/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aurora_data.corpus import select_stdlib_files
from aurora_data.filelist import write_file_list
from aurora_data.gpt import BlendedGPTDataset
from aurora_data.prepare import prepare

TRAINER_SAMPLES_PER_S = 8.0  # a trainer step rate to compare against (seq 128)


def bench_prepare(files: list[Path], out: Path, tokenizer: str, vocab: int) -> Path:
    res = prepare(files, out, name=tokenizer, tokenizer=tokenizer, vocab_size=vocab, progress=False)
    train = f", + BPE training {res.train_seconds:5.1f} s" if res.train_seconds else ""
    print(f"prepare  {tokenizer:5s}: {res.text_bytes / 1e6:5.2f} MB text, {res.documents} docs, {res.tokens:,} tokens "
          f"in {res.seconds:5.1f} s = {res.mb_per_s:6.2f} MB/s (tokenize + write){train}")
    return res.prefix


def bench_loader(prefix: Path, seq: int, batch: int, seconds: float, work: Path) -> float:
    lst = write_file_list(work / f"blend-{seq}.txt", [(0.7, prefix, "books"), (0.3, prefix, "code")])
    num_samples = 100_000_000 // seq  # 100 M tokens of training: many epochs of the small corpus
    t0 = time.perf_counter()
    src = BlendedGPTDataset(lst, seq_len=seq, num_samples=num_samples, cache_dir=work / f"cache-{seq}")
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    BlendedGPTDataset(lst, seq_len=seq, num_samples=num_samples, cache_dir=work / f"cache-{seq}")
    warm = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        src.samples(n % (len(src) - batch), batch)  # consecutive global batches, as a trainer reads them
        n += batch
    rate = n / (time.perf_counter() - t0)
    print(f"loader seq {seq:4d}: {rate:9.0f} samples/s ({rate * seq / 1e6:6.1f} M tokens/s) in batches of {batch}; "
          f"index build {cold:4.1f} s for {len(src):,} samples, cached reopen {warm:4.2f} s")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=8.0, help="corpus size (MB of stdlib source)")
    ap.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary size")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per loader measurement")
    args = ap.parse_args()
    files = select_stdlib_files(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench_prepare(files, work / "byte", "byte", args.vocab)
        prefix = bench_prepare(files, work / "bpe", "bpe", args.vocab)
        bench_loader(prefix, 4096, 8, args.seconds, work)
        rate = bench_loader(prefix, 128, 64, args.seconds, work)
    print(f"a trainer at {TRAINER_SAMPLES_PER_S:g} samples/s (seq 128) uses {TRAINER_SAMPLES_PER_S / rate:.3%} of one "
          f"core's loader throughput ({rate / TRAINER_SAMPLES_PER_S:,.0f}x headroom): the loader is not the bottleneck")


if __name__ == "__main__":
    main()
