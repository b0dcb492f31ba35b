#!/usr/bin/env bash
# Draws the built-in characters' avatars (256×256 PNG): a two-colour gradient,
# a soft emblem and the character's initials. Needs ImageMagick and DejaVu fonts.
# Run from anywhere: bash assets/characters/make-avatars.sh
set -euo pipefail
cd "$(dirname "$0")"
draw() { # key, top colour, bottom colour, initials, emblem (an ImageMagick draw primitive)
  convert -size 256x256 "gradient:$2-$3" \
    -fill 'rgba(255,255,255,0.16)' -draw "$5" \
    -font DejaVu-Serif-Bold -pointsize 96 -fill 'rgba(255,255,255,0.92)' \
    -gravity center -annotate +0+8 "$4" \
    -strip -define png:compression-level=9 "$1.png"
}
draw captain-isolde-varga   '#1d3557' '#e76f51' IV 'ellipse 128,70 110,34 0,360'
draw inspector-tomas-reyes  '#22223b' '#4a4e69' TR 'rectangle 0,180 256,256'
draw wren-ashdown           '#2d6a4f' '#b7e4c7' WA 'circle 200,60 236,60'
draw kestrel                '#03045e' '#00b4d8' K  'circle 128,128 128,20'
draw lady-evangeline-thorne '#10002b' '#5a189a' ET 'ellipse 128,40 60,90 0,360'
draw june-park              '#9c6644' '#ede0d4' JP 'roundrectangle 60,170 196,236 20,20'
