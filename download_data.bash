#!/usr/bin/env bash
# Fetch what PointAvatar needs beyond the pip packages. Run from the repository root:
#     bash download_data.bash            # subject1 data + its pretrained checkpoint + network weights
#     bash download_data.bash all        # the three subjects
#     bash download_data.bash weights    # only the VGG16 / AlexNet / LPIPS weight files
#
# The FLAME model cannot be fetched by a script: it is licensed. Register at https://flame.is.tue.mpg.de,
# download FLAME 2020 and put generic_model.pkl into code/flame/FLAME2020/ (see the README there).
set -euo pipefail
cd "$(dirname "$0")"

what="${1:-subject1}"
base=https://dataset.ait.ethz.ch/downloads/IMavatar_data
# The released archives carry the subjects' original names; the confs use the anonymised ones.
declare -A archive=([subject1]=yufeng [subject2]=marcel [subject3]=soubhik)

fetch() {  # fetch URL DEST
    if [ -s "$2" ]; then echo "have $2"; return; fi
    mkdir -p "$(dirname "$2")"
    echo "downloading $1"
    if command -v wget >/dev/null; then wget -q --show-progress -O "$2.part" "$1"; else curl -fL -o "$2.part" "$1"; fi
    mv "$2.part" "$2"
}

subject() {  # subject NAME: IMavatar-format data and the released PointAvatar checkpoint
    local name=$1 zip=${archive[$1]}
    mkdir -p data/datasets data/experiments
    fetch "$base/data/$zip.zip" "data/datasets/$zip.zip"
    (cd data/datasets && unzip -qn "$zip.zip")
    [ -e "data/datasets/$name" ] || ln -s "$zip" "data/datasets/$name"
    fetch "$base/pointavatar_checkpoint/$zip.zip" "data/experiments/$zip.zip"
    (cd data/experiments && unzip -qn "$zip.zip")
    [ -e "data/experiments/$name" ] || ln -s "$zip" "data/experiments/$name"
}

weights() {
    # torchvision-format ImageNet weights, read by our own VGG16 (perceptual loss) and AlexNet (LPIPS).
    local hub
    hub=$(python -c "import torch; print(torch.hub.get_dir())")/checkpoints
    fetch https://download.pytorch.org/models/vgg16-397923af.pth "$hub/vgg16-397923af.pth"
    fetch https://download.pytorch.org/models/alexnet-owt-7be5be79.pth "$hub/alexnet-owt-7be5be79.pth"
    # The LPIPS v0.1 linear heads ship inside the lpips wheel on PyPI; take the file, not the package.
    if [ ! -s "$hub/lpips_v0.1_alex.pth" ]; then
        tmp=$(mktemp -d)
        python -m pip download -q --no-deps --only-binary=:all: -d "$tmp" lpips==0.1.4
        python - "$tmp" "$hub/lpips_v0.1_alex.pth" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/lpips-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("lpips/weights/v0.1/alex.pth"))
PY
        rm -rf "$tmp"
        echo "wrote $hub/lpips_v0.1_alex.pth"
    fi
}

case "$what" in
    subject1|subject2|subject3) subject "$what"; weights ;;
    all) subject subject1; subject subject2; subject subject3; weights ;;
    weights) weights ;;
    *) echo "usage: bash download_data.bash [subject1|subject2|subject3|all|weights]" >&2; exit 2 ;;
esac
echo "done. FLAME: put generic_model.pkl into code/flame/FLAME2020/ (licensed, see its README)."
