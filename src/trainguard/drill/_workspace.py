"""Where a drill works: a throwaway folder with its own trainguard home, keys, ledger and job copies.

Nothing outside it is written: the user's ledger, keys, checkpoints and environment are never touched,
since every run gets TRAINGUARD_HOME, the ledger and the trust policy of the workspace.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from trainguard.provenance import PrivateKey

__all__ = ["JOB_FILES", "Workspace"]

JOB_FILES = Path(__file__).resolve().parent / "job"
# Variables of the caller's that would point a run at the user's own home, ledger, keys or policies.
_INHERITED_OUT = ("TRAINGUARD_",)


class Workspace:
    """The drill's folder: `home` (TRAINGUARD_HOME, with the team's checkpoint key at its default place,
    which `trainguard.save` uses), `trust.toml` (trusting that key) and one folder per run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.key_path = self.home / "keys" / "signing.pem"
        self.policy = root / "trust.toml"

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        if not self.key_path.exists():
            self.key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = PrivateKey.generate("ed25519")
            key.save(self.key_path)
            key.public().save(self.key_path.with_name("signing.pem.pub"))
            self.policy.write_text(
                f'[[trust.key]]\nname = "drill-team"\npath = "{self.key_path.with_name("signing.pem.pub")}"\n'
            )

    def run_folder(self, run: str) -> Path:
        """A fresh, empty folder for one run (a script's working directory)."""
        folder = self.root / "runs" / run
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return folder

    def job_copy(self, run: str) -> Path:
        """A fresh copy of the job's code for one run (an attack may edit it)."""
        folder = self.run_folder(run)
        shutil.copytree(JOB_FILES, folder / "job", ignore=shutil.ignore_patterns("__pycache__"))
        (folder / "out").mkdir()
        (folder / "ckpt").mkdir()
        return folder

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_OUT)}
        env.update(
            {
                "TRAINGUARD_HOME": str(self.home),
                "TRAINGUARD_TRUST_POLICY": str(self.policy),
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.pop("PYTHONPATH", None)
        env.update(extra or {})
        return env
