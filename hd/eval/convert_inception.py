"""Convert pytorch-fid's InceptionV3 weights (.pth) to the pickle `load_inception_params` reads.

    python -m hd.eval.convert_inception --pt pt_inception-2015-12-05-6726825d.pth --out inception.pkl

Needs torch (only here). Prints the output's sha256: put it in the config as the expected hash.
Pass --pt-sha256 to verify the input. Names like `...-6726825d.pth` follow torch.hub's convention of ending in
the first hex digits of the file's sha256; a mismatch with such a suffix is reported as a warning only, because
we could not confirm that pytorch-fid's file follows the convention.
"""

from __future__ import annotations

import argparse
import re
import sys

from hd.eval.inception import file_sha256, save_inception_params, torch_state_dict_to_variables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pt", required=True, help="pytorch-fid state dict, e.g. pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--out", required=True, help="output pickle")
    parser.add_argument("--pt-sha256", default=None, help="optional full sha256 the .pth must have")
    args = parser.parse_args(argv)

    try:
        import torch  # local: optional, not in requirements.txt; only this converter needs it
    except ImportError:
        sys.exit("convert_inception needs PyTorch to read the .pth file: pip install torch (CPU build is enough), "
                 "or convert on another machine and copy the pickle here.")

    pt_hash = file_sha256(args.pt)
    suffix = re.search(r"-([0-9a-f]{8,64})\.pth$", args.pt)
    if args.pt_sha256 is not None and pt_hash != args.pt_sha256.strip().lower():
        sys.exit(f"{args.pt} has sha256 {pt_hash}, expected {args.pt_sha256}")
    if suffix and not pt_hash.startswith(suffix.group(1)):
        print(f"warning: {args.pt} has sha256 {pt_hash}, which does not start with {suffix.group(1)} from its name; "
              "check the download", file=sys.stderr)

    state = torch.load(args.pt, map_location="cpu", weights_only=True)
    variables = torch_state_dict_to_variables({k: v.detach().cpu().numpy() for k, v in state.items()})
    out_hash = save_inception_params(variables, args.out)
    print(f"input  {args.pt} sha256 {pt_hash}")
    print(f"output {args.out} sha256 {out_hash}")


if __name__ == "__main__":
    main()
