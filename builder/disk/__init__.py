"""Stage 6, the device: an image unpacked into a bootable A/B GPT disk (ESP, erofs slots, the layer
store, the device's own /etc), and QEMU that boots it.
"""
