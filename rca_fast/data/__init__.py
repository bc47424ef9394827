"""Datasets: the built-in synthetic scenes, PASCAL VOC 2012 and COCO 2014 (list formats)."""
from .collate import collate
from .synthetic import SyntheticShapes, class_names as synthetic_class_names, export_voc
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, PublicTrainTransform, TrainTransform, normalize_image,
                         public_color_jitter, resize_long)
from .voc import (COCO_CLASSES, VOC_CLASSES, DataFileError, VOCClassification, VOCSegmentation, find_image,
                  find_mask_dir, load_cls_labels, load_image, load_mask, read_class_list, write_class_list)

__all__ = ["collate", "SyntheticShapes", "synthetic_class_names", "export_voc", "IMAGENET_MEAN",
           "IMAGENET_STD", "PublicTrainTransform", "TrainTransform", "normalize_image", "public_color_jitter",
           "resize_long", "COCO_CLASSES", "VOC_CLASSES",
           "DataFileError", "VOCClassification", "VOCSegmentation", "find_image", "find_mask_dir",
           "load_cls_labels", "load_image", "load_mask", "read_class_list", "write_class_list"]
