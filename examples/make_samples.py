"""Write a folder of sample checkpoints for a first scan: genuine ones and planted ones.

The planted payloads only run `echo TRAINGUARD-MARKER`; nothing here is ever loaded.
Usage: python examples/make_samples.py DIR
"""

from __future__ import annotations

import gzip
import io
import pickle
import sys
import zipfile
from pathlib import Path

PAYLOAD = b"(S'echo TRAINGUARD-MARKER'\ntR."


def genuine(out: Path) -> None:
    import joblib
    import numpy as np
    import torch
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.LayerNorm(16))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    hf = out / "genuine" / "hf-checkpoint"
    hf.mkdir(parents=True)
    torch.save(model.state_dict(), hf / "pytorch_model.bin")
    torch.save(optimizer.state_dict(), hf / "optimizer.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, hf / "model.safetensors")
    (hf / "config.json").write_text('{"hidden_size": 16}\n')
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, out / "genuine" / "bf16.pt")
    torch.save(model.state_dict(), out / "genuine" / "legacy.pt", _use_new_zipfile_serialization=False)
    np.savez_compressed(out / "genuine" / "arrays.npz", w=np.ones((8, 8)), b=np.zeros(8))
    joblib.dump({"mean": np.arange(16.0), "steps": 100}, out / "genuine" / "stats.joblib", compress=3)


def planted(out: Path) -> None:
    bad = out / "planted"
    bad.mkdir(parents=True)
    (bad / "os_system.pkl").write_bytes(b"cos\nsystem\n" + PAYLOAD)
    # STACK_GLOBAL whose names come back from the memo, which several scanners do not follow.
    memo = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93\x8c\x16echo TRAINGUARD-MARKER\x94\x85R."
    (bad / "memo_stack_global.bin").write_bytes(memo)
    # A real checkpoint with its data.pkl swapped for a payload, under a name that hides it.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(
            "archive/data.pkl", b"\x80\x02csubprocess\ncall\n(]S'echo'\naS'TRAINGUARD-MARKER'\natR."
        )
        archive.writestr("archive/version", "3\n")
    (bad / "model.safetensors").write_bytes(buf.getvalue())
    (bad / "compressed.pt.gz").write_bytes(
        gzip.compress(b"cbuiltins\nexec\n(S'print(\"TRAINGUARD-MARKER\")'\ntR.")
    )
    (bad / "pickle_then_checkpoint.pt").write_bytes(pickle.dumps(1)[:-1] + b"0cos\nsystem\n" + PAYLOAD)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    if out.exists() and any(out.iterdir()):
        print(f"{out} is not empty; choose a new folder", file=sys.stderr)
        return 2
    genuine(out)
    planted(out)
    print(f"wrote samples to {out}: genuine/ should scan clean, planted/ must not")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
