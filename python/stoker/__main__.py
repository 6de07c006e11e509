"""Command line: `python -m stoker bench [options]`."""

import sys


def _main(argv: list[str]) -> int:
    if not argv or argv[0] != "bench":
        print("usage: python -m stoker bench [--quick] [--scale S] [--rounds N] [--budget SECONDS] [--only TEXT] "
              "[--json FILE] [--plot FILE]   (python -m stoker bench --help for more)", file=sys.stderr)
        return 2
    from stoker._bench import main

    return main(argv[1:])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
