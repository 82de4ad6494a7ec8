"""`python -m conceptscope_cli` (and `torchrun -m conceptscope_cli`) entry point."""

from conceptscope_cli.cli.app import main

if __name__ == "__main__":
    main()
