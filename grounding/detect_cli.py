"""``python -m grounding.detect``: boxes for phrases in image files, as JSON (the command line over
:class:`grounding.detect.BoxDetector`); ``--save-tiny DIR`` writes the tiny offline test detector."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from grounding.cli import UsageError, field_flags, flag_hint, run_cli
from grounding.detect import BoxDetector, DetectorConfig
from grounding.image import decode_image


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m grounding.detect IMAGE --phrases "red ball" "blue box" [--model DIR]`` -> JSON.

    ``--save-tiny DIR`` writes the tiny offline detector and exits.
    """
    ap = argparse.ArgumentParser(prog="python -m grounding.detect", description=main.__doc__)
    ap.add_argument("images", nargs="*", help="image files")
    ap.add_argument("--phrases", nargs="+", default=[], help="phrases to box in every image")
    ap.add_argument("--save-tiny", metavar="DIR", help="write the tiny random-init detector to DIR and exit")
    defaults = DetectorConfig()
    for name, value in asdict(defaults).items():
        kind = type(value) if value is not None else (int if name.endswith(("edge", "tokens")) else str)
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    args = ap.parse_args(argv)
    if args.save_tiny:
        from grounding.testing import save_tiny_detector
        print(save_tiny_detector(args.save_tiny))
        return 0
    try:
        config = DetectorConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    except ValueError as e:
        raise UsageError(flag_hint(str(e), field_flags(list(asdict(defaults))))) from e
    if not args.images or not args.phrases:
        raise UsageError("give image files and --phrases to box in them (or --save-tiny DIR)")
    images = []
    for p in args.images:
        try:
            images.append(decode_image(p))
        except (OSError, ValueError) as e:  # PIL's errors, ImageTooLarge
            raise UsageError(f"{p}: not a readable image ({type(e).__name__}); check the image arguments") from e
    try:
        detector = BoxDetector(config)
    except (OSError, ValueError) as e:  # no such folder, not a GroundingDINO checkpoint, offline hub name
        raise UsageError(f"--model {config.model}: cannot load the detector ({str(e).splitlines()[0]})") from e
    keys = [Path(p).stem for p in args.images]
    results = detector(images, [args.phrases] * len(images), keys=keys)
    json.dump({"detector": detector.name, "weights_id": detector.weights_id, "config": asdict(config),
               "images": [{"path": p, "phrases": [{"phrase": ph, **asdict(r)} for ph, r in zip(args.phrases, res)]}
                          for p, res in zip(args.images, results)]}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
