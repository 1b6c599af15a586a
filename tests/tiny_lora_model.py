"""A two-projection torch module for the peft adapter tests (importable as
``tiny_lora_model``: pytest puts tests/ on the path)."""

import torch


class Tiny(torch.nn.Module):
    """``q_proj(x) + v_proj(x)``, two bias-free ``d_in -> d_out`` projections: the
    smallest model peft can put LoRA adapters on by module name."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.q_proj = torch.nn.Linear(d_in, d_out, bias=False)
        self.v_proj = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.q_proj(x) + self.v_proj(x)
