"""Generated code for protos/sampa/v1 (scripts/gen_protos.sh)."""
