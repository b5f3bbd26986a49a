"""Stage entry points: parse, build from `pipeline`, run, close."""
