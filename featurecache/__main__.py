"""``python -m featurecache``: the command line."""

from featurecache.cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="featurecache")
