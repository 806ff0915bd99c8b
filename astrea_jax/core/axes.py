"""Mesh axes and logical axis names. Modules name the axes of their parameters and activations with these; the rules
mapping them to mesh axes are data in the config (`config.logical_axis_rules`, default `DEFAULT_LOGICAL_AXIS_RULES`)."""

MESH_AXES = ('data', 'fsdp', 'tensor')

# Activation axes.
BATCH, LENGTH, EMBED_ACT = 'activation_batch', 'activation_length', 'activation_embed'
HEADS_ACT, KV_HEADS_ACT, MLP_ACT, VOCAB_ACT = ('activation_heads', 'activation_kv_heads', 'activation_mlp',
                                                'activation_vocab')

# Logical axis name -> mesh axes (None: replicated). Params and activations both use these names; the first rule
# whose mesh axes are all present (and unused in that array) applies, as in flax.linen.logical_to_mesh_axes.
DEFAULT_LOGICAL_AXIS_RULES = (
    # activations
    (BATCH, ('data', 'fsdp')),
    (LENGTH, None),
    (EMBED_ACT, None),
    (HEADS_ACT, 'tensor'),
    (KV_HEADS_ACT, 'tensor'),
    (MLP_ACT, 'tensor'),
    (VOCAB_ACT, 'tensor'),
    # parameters
    ('layers', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('q_heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('experts', None),       # the router's outputs and the adapters' leading axis (4 experts: replicated)
    ('contrastive', None),   # the MoCo heads' embedding width
)
