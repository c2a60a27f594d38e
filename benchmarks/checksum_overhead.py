"""What the integrity checks of issue 14 cost: checkpoint loads and token-shard reads with and without them.

Side by side in one run, same files, warm page cache (the second read of each is timed):
  * a ~100 MB released checkpoint (a ladder model in fp32): ``load_pretrained`` with ``verify=False``
    vs ``verify=True`` (sha256 of every weight file against ``checksums.sha256``);
  * a training-state checkpoint of the same model (weights + AdamW moments, ~3x the bytes): ``load_training_state``;
  * ~64 MB of token shards: first read of every shard with and without its sha256, and the per-batch
    vocabulary check (one max over the batch) as a share of building the batch.

    python benchmarks/checksum_overhead.py [--preset ladder-10m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def best_of(fn, repeats: int) -> float:
    fn()  # warm the page cache
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ladder-10m")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from baichuan2.model import Baichuan, ModelConfig
    from baichuan2.model.checkpoint import load_pretrained, save_pretrained
    from baichuan2.tokenizer.shards import TokenShards, write_shard
    from baichuan2.train.checkpoint import load_training_state, save_training_state
    from baichuan2.train.data import PackedDataset
    from baichuan2.utils.io import atomic_write_json

    torch.manual_seed(0)
    model = Baichuan(ModelConfig.from_name(args.preset, vocab_size=args.vocab))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        release = save_pretrained(model, tmp / "release")
        size = sum(p.stat().st_size for p in release.glob("*.safetensors"))
        off = best_of(lambda: load_pretrained(release, verify=False), args.repeats)
        on = best_of(lambda: load_pretrained(release, verify=True), args.repeats)
        print(f"release {size / 1e6:.0f} MB: load {off * 1e3:.0f} ms unchecked, {on * 1e3:.0f} ms checked "
              f"(+{(on - off) * 1e3:.0f} ms, x{on / off:.2f}; {size / 1e6 / max(on - off, 1e-9):.0f} MB/s hashed)")

        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(3, 500, (1, 16))
        model(ids, ids).loss.backward()
        opt.step()
        ckpt = save_training_state(tmp / "run", 1, model, opt, {"step": 1}, rank=0, distributed=False)
        size = sum(p.stat().st_size for p in ckpt.iterdir())
        fresh = Baichuan(ModelConfig.from_name(args.preset, vocab_size=args.vocab))
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-4)
        fresh(ids, ids).loss.backward()
        fresh_opt.step()
        off = best_of(lambda: load_training_state(ckpt, fresh, fresh_opt, 0, verify=False), args.repeats)
        on = best_of(lambda: load_training_state(ckpt, fresh, fresh_opt, 0, verify=True), args.repeats)
        print(f"training state {size / 1e6:.0f} MB: resume {off * 1e3:.0f} ms unchecked, {on * 1e3:.0f} ms checked "
              f"(+{(on - off) * 1e3:.0f} ms, x{on / off:.2f})")

        shard_dir = tmp / "shards"
        rng = np.random.default_rng(0)
        for k in range(4):
            write_shard(shard_dir / f"shard-{k:05d}", [rng.integers(3, args.vocab, 4000) for _ in range(1000)],
                        eos_id=2)
        atomic_write_json(shard_dir / "manifest.json", {"tokenizer": {"vocab_size": args.vocab}})
        size = sum(p.stat().st_size for p in shard_dir.glob("*.bin"))

        def first_reads(verify):
            shards = TokenShards(str(shard_dir), verify=verify)
            for s in shards.shards:
                s.doc(0)

        off = best_of(lambda: first_reads(False), args.repeats)
        on = best_of(lambda: first_reads(True), args.repeats)
        print(f"token shards {size / 1e6:.0f} MB: open + first read {off * 1e3:.1f} ms unchecked, {on * 1e3:.1f} ms "
              f"checked (+{(on - off) * 1e3:.0f} ms once per shard per run)")
        data = PackedDataset(str(shard_dir), seq_len=4096, seed=0)
        rows = list(range(16))
        batch = best_of(lambda: data.batch(rows), args.repeats)
        stacked = np.stack([data.row(i)[0] for i in rows])
        check = best_of(lambda: bool(stacked.max() >= data.vocab_size), args.repeats * 10)
        print(f"batch of 16 x 4096 tokens: built in {batch * 1e3:.1f} ms, of which the id check takes "
              f"{check * 1e3:.3f} ms ({check / batch:.2%})")

if __name__ == "__main__":
    main()
