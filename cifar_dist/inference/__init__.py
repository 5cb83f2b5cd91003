"""Using what was trained: predictions on image files, exports, shareable weights."""
