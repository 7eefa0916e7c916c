"""Reading (and writing) the checkpoint formats our users already have: MindSpore, torchvision, timm."""
