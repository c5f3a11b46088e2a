# Sourced by tests/service_e2e.sh and scripts/kill_soak.sh: the tiny LoopMoE job both run through
# the service, on a dataset made of the repository's docs (one document per line).
#
#   tiny_service_data LOOPMOE_BIN REPO_DIR DIR      # DIR/text/docs.txt -> DIR/data (vocab 512)
#   tiny_service_job FILE DATA_DIR STEPS EVAL_INTERVAL CHECKPOINT_INTERVAL

tiny_service_data() {
  mkdir -p "$3/text" &&
    cat "$2"/docs/*.md > "$3/text/docs.txt" &&
    "$1" data prepare --input "$3/text" --docs-per-line --vocab 512 --out "$3/data" \
      > "$3/prepare.log" 2>&1
}

tiny_service_job() {
  cat > "$1" <<TOML
[model]
vocab_size = 512
seq_len = 64
d_model = 64
n_heads = 2
head_dim = 32
n_layers = 2
n_loops = 2
n_experts = 6
top_k = 2
expert_hidden = 64
iter_adaln = "joint"
cond_dim = 16
capacity_factor = 1.25
[train]
batch_size = 8
steps = $3
warmup_steps = 10
eval_interval = $4
eval_batches = 2
checkpoint_interval = $5
log_interval = 1
[data]
dir = "$2"
TOML
}
