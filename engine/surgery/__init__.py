"""Surgery: module swap, organs and bridges, rank-k conjugation, the rotated twin, reversible edits."""
