"""``python -m htsr_cli`` (also what ``torchrun -m htsr_cli`` runs)."""

from htsr_cli.cli import main

if __name__ == "__main__":
    main()
