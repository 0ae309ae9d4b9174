"""oatui_kernels: custom kernels for the PPO stage (the folder kernels/, imported as oatui_kernels)."""
