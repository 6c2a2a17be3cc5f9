"""Write the small PyTorch reference outputs under tests/fixtures/ that CI checks hd's ports against, without
torch. Needs `pip install torch diffusers` (neither is in requirements.txt):

    python -m hd.tools.make_fixtures --out=tests/fixtures            # every fixture
    python -m hd.tools.make_fixtures --out=tests/fixtures --only=vae  # one of: sit, vae
"""

from __future__ import annotations

import argparse
import os


# --- SiT: a small SiT-structured network with every weight random --------------------------------------------

def write_sit_fixture(out_dir: str) -> None:
    raise NotImplementedError("SiT fixture: being written")


# --- SD-VAE: diffusers.AutoencoderKL at a tiny random config --------------------------------------------------

def write_vae_fixture(out_dir: str) -> None:
    raise NotImplementedError("VAE fixture: being written")


WRITERS = {"sit": write_sit_fixture, "vae": write_vae_fixture}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/fixtures", help="output folder")
    parser.add_argument("--only", choices=sorted(WRITERS), action="append", help="write only these fixtures")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.only or sorted(WRITERS):
        WRITERS[name](args.out)


if __name__ == "__main__":
    main()
