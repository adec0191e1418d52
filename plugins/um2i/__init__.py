"""UM2I (Xing et al., "Less is More"): unsupervised-mask-guided synthesis of images with annotations."""
