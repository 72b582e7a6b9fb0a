"""The trained model: its description (``model``: spec, preprocessing), the run on disk
(``workdir``), checkpoint reading, the export bundle (``bundle``), running a bundle
(``classifier``), classifying raw files (``classify``) and older formats (``legacy``)."""
