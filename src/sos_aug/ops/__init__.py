"""The ground floor: operations every room of sos_aug stands on (masks and boxes, resizing,
buffers, backend choice and fallback). Nothing here imports from above."""
