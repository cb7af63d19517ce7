"""Variational families: Pyro autoguides, normalizing-flow guides and amortized encoders."""

import vilab.supports  # noqa: F401 - MixtureSameFamily sites (see that module)
from vilab.guides.amortized.flows import FLOWS, AmortizedFlowGuide, ConditionalSylvester
from vilab.guides.amortized.dmm import DMMGuide
from vilab.guides.amortized.encoders import AmortizedNormalGuide, ConvEncoder, MLPEncoder
from vilab.guides.flows import AutoFlow, ElementwiseAffine
from vilab.guides.amortized.hierarchical import ConditionalGaussian, HierarchicalNormalGuide, TwoLevelLatent
from vilab.guides.registry import AutoMAP, GuideInfo, get_guide, guide_name, list_guides
from vilab.guides.amortized.poe import PoEGuide, product_of_experts
from vilab.guides.serialization import load_guide, save_guide
from vilab.guides.amortized.von_mises_fisher import HypersphericalUniform, VonMisesFisher

__all__ = [
    "AutoFlow",
    "ElementwiseAffine",
    "AutoMAP",
    "GuideInfo",
    "get_guide",
    "guide_name",
    "list_guides",
    "save_guide",
    "load_guide",
    "AmortizedNormalGuide",
    "ConvEncoder",
    "MLPEncoder",
    "FLOWS",
    "AmortizedFlowGuide",
    "ConditionalSylvester",
    "DMMGuide",
    "PoEGuide",
    "product_of_experts",
    "VonMisesFisher",
    "HypersphericalUniform",
    "ConditionalGaussian",
    "HierarchicalNormalGuide",
    "TwoLevelLatent",
]
