"""DiffuseExpand (Shao et al.): masks from noise, images from masks with segmenter guidance, Dice filter."""
