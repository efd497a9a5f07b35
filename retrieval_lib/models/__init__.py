"""Backbones: EfficientNet-Lite (offline ImageNet weights) and ResNet, as feature-map extractors."""
from retrieval_lib.models.backbones import efficientnet_lite, load_backbone, resnet50_cgd
