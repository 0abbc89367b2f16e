"""Update rules: how a fast weight programmer writes its memory. Registry: name -> class."""
from models.rules.base import UpdateRule
from models.rules.delta import DeltaRule, delta_rule_chunkwise, delta_rule_recurrent
from models.rules.fwl import FWLRule, fwl_rule_parallel, fwl_rule_recurrent
from models.rules.fwm import FWMRule, fwm_chunkwise, fwm_recurrent, fwm_write
from models.rules.sum import SumRule, linear_attention_parallel, linear_attention_recurrent

UPDATE_RULES: dict[str, type[UpdateRule]] = {
    "sum": SumRule,
    "delta": DeltaRule,
    "fwm": FWMRule,
    "fwl": FWLRule,
}


def build_rule(name: str, d_key: int, d_value: int, **options) -> UpdateRule:
    if name not in UPDATE_RULES:
        raise ValueError(f"unknown update rule {name!r}; choose from {', '.join(UPDATE_RULES)}")
    try:
        return UPDATE_RULES[name](d_key, d_value, **options)
    except TypeError as error:
        raise ValueError(f"update rule {name!r}: {error}") from None


__all__ = [
    "UPDATE_RULES", "UpdateRule", "build_rule", "SumRule", "DeltaRule", "FWMRule",
    "linear_attention_recurrent", "linear_attention_parallel", "delta_rule_recurrent",
    "delta_rule_chunkwise", "fwm_recurrent", "fwm_chunkwise", "fwm_write", "FWLRule", "fwl_rule_parallel",
    "fwl_rule_recurrent",
]
