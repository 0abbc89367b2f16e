"""Fast weight memories: feature maps, update rules, the retrieval model and Fast Weight Layers."""
