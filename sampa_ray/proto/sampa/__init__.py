"""Generated code for protos/sampa (scripts/gen_protos.sh)."""
