
Ï
fuzz«[model]
vocab_size = 8
seq_len = 4
d_model = 4
n_heads = 1
head_dim = 2
n_layers = 1
n_loops = 2
n_experts = 2
top_k = 1
expert_hidden = 2
iter_adaln = "iter"
cond_dim = 2
tie_embeddings = true
renormalize = true
capacity_factor = 0.0
aux_loss_coef = 0.01
z_loss_coef = 0.001
rope_theta = 10000.0
init_std = 0.02

[train]
batch_size = 16
steps = 10
lr = 0.0030000000000000001
min_lr_ratio = 0.10000000000000001
warmup_steps = 2
weight_decay = 0.10000000000000001
beta1 = 0.90000000000000002
beta2 = 0.94999999999999996
eps = 1e-08
grad_clip = 1.0
seed = 1234
eval_interval = 100
eval_batches = 8
checkpoint_interval = 250
log_interval = 10
grad_groups = 8

[data]
dir = "/fuzz/data"
 (2 (:	/fuzz/out