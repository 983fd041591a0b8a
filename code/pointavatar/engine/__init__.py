"""What training and evaluation share: experiment folders, checkpoints, frame-input tables, device
choice, batching, plots and pretrained weight files. Imports config, data, flame, render and model;
never train or evaluate."""
