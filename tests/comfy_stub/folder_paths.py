"""folder_paths: the model folder registry (subset). Tests point ``folder_names_and_paths`` at a
temporary directory; ComfyUI's ``diffusion_models`` entry also covers the legacy ``unet`` folder."""
import os
import tempfile

folder_names_and_paths = {"diffusion_models": ([], {".safetensors", ".sft", ".ckpt", ".pt", ".bin", ".pth"})}


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def get_temp_directory():
    return os.path.join(tempfile.gettempdir(), "comfy_stub_temp")


def get_output_directory():
    return os.path.join(tempfile.gettempdir(), "comfy_stub_output")
