"""``python -m onnxprune``: the command line (also under torchrun)."""

from onnxprune.cli import main

if __name__ == "__main__":
    main()
