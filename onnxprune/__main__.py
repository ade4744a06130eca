"""``python -m onnxprune``: the command line (also under torchrun)."""

from onnxprune.entry import main

if __name__ == "__main__":
    main()
