"""Classification heads on cached CLIP features: one registry, one factory.

``create_head(name, HeadInputs(num_classes, embed_dim, token_shape, text_embeds, text_encoder),
**options)`` builds a head; its class's ``needs`` say what of that context it uses, and the factory
refuses a context without it in one line. Keyword-only constructor parameters are the head's
options (``--head-opt key=value``): ``HEADS.options(name)`` reads them from the signature and
``HEADS.parse(name, opts)`` parses the CLI strings (:class:`ltclip.core.registry.Registry`).
``head.config`` records the sizes and every resolved option (JSON-serialisable), so
``rebuild_head(name, head.config)`` followed by ``load_state_dict`` rebuilds a trained head. A
head's training defaults are data registered with it (:func:`training_defaults`).

Importing this package registers every head: one module per kind of input, each registering its
heads; adding a head is a class registered in one of them (or a new module imported below).
"""

from .base import Head, HeadInputs, HeadNeeds
from .factory import HEADS, HeadDefaults, create_head, head_needs, list_heads, rebuild_head, training_defaults
from .embedding import CosineClassifier, CosineHead, LinearHead, MLPHead, TextInitHead
from .decoder import DecoderHead
from .prompt import PromptHead

__all__ = [
    "HEADS", "CosineClassifier", "CosineHead", "DecoderHead", "Head", "HeadDefaults", "HeadInputs", "HeadNeeds",
    "LinearHead", "MLPHead", "PromptHead", "TextInitHead", "create_head", "head_needs", "list_heads",
    "rebuild_head", "training_defaults",
]
