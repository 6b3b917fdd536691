"""Your own torch.nn.Modules, one module each, built from configs/model/<name>.yaml (`_target_` and `config`).

The contract (see modeling.build_own_module and the README, "Your own model and data"): `forward` takes the batch's
inputs by name (input_ids and attention_mask for text, pixel_values for images) and returns the logits, or an object
with `.logits`; `__init__` may take `num_labels` or `vocab_size`, which the task passes when it does.
"""
