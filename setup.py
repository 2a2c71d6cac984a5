"""ns_plugin: nullspace methods for vision transformers in the timm / torchattacks / robustbench /
EasyRobust ecosystem.

``pip install -e .`` installs the package and the requirements that resolve cleanly. robustbench and
easyrobust pin incompatible timm versions, so ``make`` (tools/bootstrap.sh) installs those two the way
README "Why the install is unusual" explains, plus tools/autoattack_easyrobust (the ``autoattack``
module robustbench imports, running easyrobust's vendored AutoAttack).
"""
from setuptools import find_packages, setup

setup(
    name="ns_plugin",
    version="0.1.0",
    description="Nullspace methods for vision transformers, as a plugin for timm, torchattacks, "
                "robustbench and EasyRobust",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    license="MIT",
    packages=find_packages(include=["ns_plugin", "ns_plugin.*"]),
    # demo config, the embedded default model's weights (safetensors, SHA-256 checked on load), the
    # `ns-plugin run` sitecustomize and the leaderboard table template
    package_data={"ns_plugin": ["configs/*.yaml", "_data/*.safetensors", "_site/sitecustomize.py",
                                "evaluation/templates/*.j2"]},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "timm>=1.0,<1.1",
        # timm 1.0.9 loads pretrained weights through huggingface_hub and imports an API that 2.0 removed
        # (repo_type_and_id_from_hf_id); 1.33.0 is the newest release it imports (tools/bootstrap.sh pins it)
        "huggingface_hub>=1.33.0,<2",
        "numpy",
        "scipy",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "pyyaml",
        "imagecorruptions>=1.1.2",  # ImageNet-C corruptions (ns_plugin.evaluation.corruptions)
    ],
    extras_require={
        # installed with --no-deps by tools/bootstrap.sh because of upstream pins (see README)
        "ecosystem": ["torchattacks==3.5.1", "robustbench==1.1.1", "easyrobust==0.2.4"],
        "test": ["pytest", "ruff"],
    },
    entry_points={
        "console_scripts": ["ns-plugin=ns_plugin.cli:main"],
        # Neither timm 1.0.9 nor torchattacks 3.5.1 reads entry points, so we declare none for them (programs
        # that never import ns_plugin see our models and attacks through `ns-plugin run`). Third-party
        # packages declare attacks under "ns_plugin.attacks" (Name = package.module:Class); ns_plugin.register()
        # loads them into torchattacks (tests/test_plugins.py installs such a distribution).
    },
)
