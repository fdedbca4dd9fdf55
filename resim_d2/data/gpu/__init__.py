"""The GPU view path: ReSim's two views for a whole batch at once, on the device.

The CPU path (:class:`~resim_d2.data.two_view_mapper.TwoViewMapper`) renders every view in a
dataloader worker with PIL. Here the workers only read the files and draw the random parameters,
and every pixel operation runs batched on the device (a GPU; the CPU in CI). One concern a module:

* :mod:`.decode`: which files the device can decode (nvJPEG), the decoding, EXIF orientation;
* :mod:`.resample`: crop and resize with PIL's own bilinear (antialiased) weights;
* :mod:`.colour`: MoCo-v2's colour augmentation with per-view parameters;
* :mod:`.views`: :class:`~.views.GPUViews`, a packed batch -> ``list[dict]`` as the CPU path's;
* :mod:`.loader`: the workers' reader and collator, the prefetching loader, and
  ``build_gpu_pretrain_loader`` (``RESIM.VIEWS.BACKEND "gpu"``);
* :mod:`.transfer`: small host-to-device copies.

``resim_d2.data.gpu_views`` and ``resim_d2.data.gpu_loader`` re-export these names.
"""
