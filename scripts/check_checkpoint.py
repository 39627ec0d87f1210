"""Inspect a shoal checkpoint (.safetensors): prints one JSON line
{"tensors": {name: [shape...]}, "dtypes": {name: "float32", ...}, "metadata": {...}, "numel": N}.
Exits non-zero, with the reason on stderr, when the file cannot be read.

    python check_checkpoint.py CHECKPOINT.safetensors
"""
import json
import sys


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    path = sys.argv[1]
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # missing file, bad header, truncated data, ...
        print(f"check_checkpoint: cannot read {path}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    names = sorted(tensors)
    print(json.dumps({
        "tensors": {n: list(tensors[n].shape) for n in names},
        "dtypes": {n: str(tensors[n].dtype).removeprefix("torch.") for n in names},
        "metadata": metadata,
        "numel": sum(tensors[n].numel() for n in names),
    }), flush=True)


if __name__ == "__main__":
    main()
