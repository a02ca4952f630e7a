"""Training GroundingDINO on boxed phrases (the app beside the ``grounding`` library; no Ray, no spaCy).

``python -m detector.train --help``; :mod:`detector.loss` carries the fixes of two upstream loss defects.
"""
