"""Download addresses, MD5 checksums and class names of the 2D single-label MedMNIST v2 sets (28 px).

Values from the ``INFO`` table of the medmnist package, version 2.1.0. ChestMNIST is
left out because it is multi-label.
"""

from __future__ import annotations

from typing import NamedTuple

RECORD_URL = "https://zenodo.org/records/6496656/files/{name}.npz?download=1"


class MedMnistSet(NamedTuple):
    md5: str
    class_names: tuple[str, ...]


ORGAN_CLASSES = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)

DATASETS: dict[str, MedMnistSet] = {
    "pathmnist": MedMnistSet(
        "a8b06965200029087d5bd730944a56c1",
        (
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
    ),
    "dermamnist": MedMnistSet(
        "0744692d530f8e62ec473284d019b0c7",
        (
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ),
    ),
    "octmnist": MedMnistSet(
        "c68d92d5b585d8d81f7112f81e2d0842",
        (
            "choroidal neovascularization",
            "diabetic macular edema",
            "drusen",
            "normal",
        ),
    ),
    "pneumoniamnist": MedMnistSet("28209eda62fecd6e6a2d98b1501bb15f", ("normal", "pneumonia")),
    "retinamnist": MedMnistSet("bd4c0672f1bba3e3a89f0e4e876791e4", ("0", "1", "2", "3", "4")),
    "breastmnist": MedMnistSet("750601b1f35ba3300ea97c75c52ff8f6", ("malignant", "normal, benign")),
    "bloodmnist": MedMnistSet(
        "7053d0359d879ad8a5505303e11de1dc",
        (
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
    ),
    "tissuemnist": MedMnistSet(
        "ebe78ee8b05294063de985d821c1c34b",
        (
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
    ),
    "organamnist": MedMnistSet("866b832ed4eeba67bfb9edee1d5544e6", ORGAN_CLASSES),
    "organcmnist": MedMnistSet("0afa5834fb105f7705a7d93372119a21", ORGAN_CLASSES),
    "organsmnist": MedMnistSet("e5c39f1af030238290b9557d9503af9d", ORGAN_CLASSES),
}
