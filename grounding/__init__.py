"""Visual-grounding data library (no Ray inside): phrases, detection, boxes, QA format, shard schema, queries."""
