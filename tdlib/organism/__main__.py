"""``python -m tdlib.organism --config organism``: build (or load from cache) the organism pair."""
import argparse

from .build import CONFIGS, build_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="organism", choices=sorted(CONFIGS))
    parser.add_argument("--rebuild", action="store_true", help="ignore the cache and train again")
    args = parser.parse_args()
    paths = build_pair(args.config, rebuild=args.rebuild)
    print(f"base:   {paths.base}\ntarget: {paths.target}")


if __name__ == "__main__":
    main()
